"""Bench section ``decisions``: do retool's timing decisions hold on a busy machine? (issue 22)

Four figures, each beside the machine's state (``retool.machine``) while it was taken:

- **interval honesty**: the same ONNX file loaded twice (the fixture CNN, converted once; fresh
  sessions for each pair) and timed in paired interleaved rounds by validate's own loop
  (``validators.latency.measure_interleaved``, 1 intra-op thread), K pairs quiet and K beside a CPU
  hog. The share of pairs the rule calls the same (the paired-ratio interval,
  ``retool.speed.paired_ratio_interval``, not wholly beyond the 2 % noise floor), wall and thread CPU
  time; goal >= 95 %. Beside it, the share of intervals that contain exactly 1.0: the bootstrap covers
  round-to-round noise, and two loads of one file also differ by a fraction of a percent.
  Also how the not-slower gate judged each identical pair on its first measurement (a ``fail`` is a
  false alarm).
- **load-robust figure**: from the same pairs, how much the median wall time and the median thread
  CPU time (``time.thread_time_ns`` around ``session.run``) move beside the hog: loaded / quiet,
  pair i against pair i, median with spread.
- **decision stability**: a small pipeline (the CNN as ONNX; targets cpu and cpu-int8; validate with
  latency and the not-slower gate; publish to a fresh repository; a serve step with a p99 budget)
  run N times quiet and N times beside the hog, alternating. Each run is compared with the first:
  a published target or chosen serving configuration that differs is a **flip**, unless either run
  reported that decision as undecided (then it is a change the runs said they could not decide).
- **cost**: the extra timing undecided gates triggered in those runs (``data.latency.extra_timing_s``
  of each validate report, i.e. ``Decision.extra_s``), median and maximum.

The hog is ``stress-ng --cpu N`` when installed, else one Python busy-loop process per usable core;
each is tied to this process's life (PR_SET_PDEATHSIG) and killed in a ``finally``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

SOURCE = "fixtures.torch_models:cnn"
HONESTY_GOAL = 0.95
SERVE_BUDGET_P99_MS = 250.0  # generous: the serve step must meet it beside the hog too
PR_SET_PDEATHSIG = 1

# The busy loop checks now and then that its parent is alive (a second guard beside PR_SET_PDEATHSIG).
_LOOP = ("import os\np = os.getppid()\nwhile os.getppid() == p:\n    for _ in range(2_000_000):\n        pass\n")


# -- the CPU hog ------------------------------------------------------------------------------------

def _die_with_parent(parent: int):
    import ctypes

    # resolved before the fork: the child of a threaded process should not import or load anything
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the loop's own parent check remains
        prctl = None

    def pre() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return pre


def hog_command(n: int) -> tuple[list[list[str]], str]:
    """The processes to start for an ``n``-core hog, and how it is described in the results."""
    exe = shutil.which("stress-ng")
    if exe:
        return [[exe, "--cpu", str(n), "--quiet"]], f"stress-ng --cpu {n}"
    return [[sys.executable, "-c", _LOOP] for _ in range(n)], f"python busy loop x {n}"


def start_hog(n: int | None = None) -> list[subprocess.Popen]:
    n = n or len(os.sched_getaffinity(0))
    cmds, _ = hog_command(n)
    procs: list[subprocess.Popen] = []
    try:
        for c in cmds:
            procs.append(subprocess.Popen(c, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True,
                                          preexec_fn=_die_with_parent(os.getpid())))
    except BaseException:
        stop_hog(procs)
        raise
    return procs


def stop_hog(procs: Sequence[subprocess.Popen]) -> None:
    """Kill every hog process (and its group: stress-ng's workers) and reap it."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)


@contextlib.contextmanager
def cpu_hog(n: int | None = None, settle_s: float = 0.5) -> Iterator[list[subprocess.Popen]]:
    """A CPU hog on ``n`` cores (default: all usable) for the duration of the block; always stopped."""
    procs = start_hog(n)
    try:
        time.sleep(settle_s)
        yield procs
    finally:
        stop_hog(procs)


# -- machine state -----------------------------------------------------------------------------------

def _block():
    from retool import machine

    return machine.Block(machine._readers).start()


def _state(block) -> dict:
    """A block's load, steal, other processes' share and the busy flag (the hog counts as others)."""
    from retool import machine

    s = block.end()
    s["busy"] = machine.busy(s.get("loadavg"), s["cores"], s.get("others_cpu_pct"))
    return s


# -- interval honesty and the load-robust figure ------------------------------------------------------

def pair_interval(reference: Sequence[float], candidate: Sequence[float]) -> dict:
    """The paired-ratio interval of one pair of series; whether it contains 1.0, and whether the rule
    calls the two different (the whole interval beyond retool.speed.NOISE_FLOOR on one side)."""
    from retool.speed import NOISE_FLOOR, paired_ratio_interval

    est, lo, hi = paired_ratio_interval(reference, candidate)
    return {"estimate": round(est, 4), "lo": round(lo, 4), "hi": round(hi, 4) if hi != float("inf") else None,
            "contains_1": bool(lo <= 1.0 <= hi),
            "rule_says_same": not (lo > 1.0 + NOISE_FLOOR or hi < 1.0 / (1.0 + NOISE_FLOOR))}


def honesty(intervals: Sequence[dict], goal: float = HONESTY_GOAL) -> dict:
    """Of identical pairs: the share the decision rule calls "no difference" (the goal), and the share
    whose bootstrap interval contains exactly 1.0 (its coverage of round-to-round noise alone: two
    sessions of one file differ by a fraction of a percent, which only the noise floor absorbs)."""
    n = len(intervals)
    c = sum(1 for i in intervals if i["contains_1"])
    same = sum(1 for i in intervals if i.get("rule_says_same", i["contains_1"]))
    frac = same / n if n else None
    est = sorted(i["estimate"] for i in intervals)
    return {"pairs": n, "rule_says_same": same, "fraction": None if frac is None else round(frac, 4),
            "contain_1": c, "fraction_contain_1": round(c / n, 4) if n else None,
            "median_estimate": est[n // 2] if n else None,
            "meets_goal": None if frac is None else frac >= goal,
            "figure": {"value": round(frac, 4) if frac is not None else 0.0, "unit": "fraction", "better": "higher"}}


def _sessions(onnx: Path):
    import numpy as np

    from retool.runtime import make_session

    a, b = make_session(onnx, threads=1), make_session(onnx, threads=1)  # the same file twice
    i = a.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in i.shape]
    feeds = {i.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    return {"reference": lambda: a.run(None, feeds), "candidate": lambda: b.run(None, feeds)}


def _pairs(variants, k: int, seconds: float) -> list[dict]:
    from bench.stats import quantile
    from retool.speed import decide
    from retool.validators.decide_gates import NOT_SLOWER_THRESHOLD
    from retool.validators.latency import MAX_RUNS, MIN_RUNS, Plan, measure_interleaved

    out = []
    for _ in range(k):
        plan = Plan(runs=None, time_budget_s=seconds, warmup=2, min_runs=MIN_RUNS, max_runs=MAX_RUNS)
        wall, cpu = measure_interleaved(variants(), plan, cpu_times=True)
        w = pair_interval(wall["reference"], wall["candidate"])
        c = pair_interval(cpu["reference"], cpu["candidate"])
        hi = c["hi"] if c["hi"] is not None else float("inf")
        gate = decide(c["estimate"], c["lo"], hi, NOT_SLOWER_THRESHOLD).outcome
        ws, cs = wall["reference"] + wall["candidate"], cpu["reference"] + cpu["candidate"]
        out.append({"rounds": len(wall["reference"]), "wall": w, "cpu": c, "not_slower": gate,
                    "wall_ms": statistics.median(ws), "cpu_ms": statistics.median(cs),
                    "wall_p90_ms": quantile(ws, 0.9), "cpu_p90_ms": quantile(cs, 0.9)})
    return out


def _phase(pairs: list[dict], state: dict) -> dict:
    from bench.stats import summarize

    outcomes = [p["not_slower"] for p in pairs]
    rounds = summarize([p["rounds"] for p in pairs], unit="rounds")
    rounds.pop("better")  # how much was timed, not a figure bench/compare.py should judge
    return {"machine": state, "rounds": rounds,
            "honesty_wall": honesty([p["wall"] for p in pairs]), "honesty_cpu": honesty([p["cpu"] for p in pairs]),
            "not_slower_first_measurement": {o: outcomes.count(o) for o in ("pass", "undecided", "fail")},
            "wall_ms": summarize([p["wall_ms"] for p in pairs], unit="ms"),
            "cpu_ms": summarize([p["cpu_ms"] for p in pairs], unit="ms"),
            "pairs": [{k: p[k] for k in ("rounds", "wall", "cpu", "not_slower")} for p in pairs]}


def load_robust(quiet: Sequence[dict], loaded: Sequence[dict]) -> dict:
    """loaded / quiet of the median (and p90) wall and thread CPU time per run, pair i against pair i."""
    from bench.stats import summarize

    n = min(len(quiet), len(loaded))
    if not n:
        return {}
    out = {}
    for key in ("wall_ms", "cpu_ms", "wall_p90_ms", "cpu_p90_ms"):
        if all(key in p for p in (*quiet[:n], *loaded[:n])):
            out[key.replace("_ms", "_loaded_over_quiet")] = summarize(
                [loaded[i][key] / quiet[i][key] for i in range(n)], unit="x")
    return out


def interval_honesty(onnx: Path, k: int, seconds: float) -> dict:
    # fresh sessions for every pair: where each one's buffers land is part of what two loads of one
    # file differ by, as for a user comparing two artifacts
    b = _block()
    quiet = _pairs(lambda: _sessions(onnx), k, seconds)
    res = {"quiet": _phase(quiet, _state(b))}
    with cpu_hog():
        b = _block()
        loaded = _pairs(lambda: _sessions(onnx), k, seconds)
        state = _state(b)  # before the hog is reaped (its CPU would count as ours after)
    res["loaded"] = _phase(loaded, state)
    res["load_robust"] = load_robust(quiet, loaded)
    return res


# -- decision stability and its cost ------------------------------------------------------------------

def pipeline_doc(onnx: Path, repo: Path, runs: int, serve: bool) -> dict:
    d = {"validation": {"batch_sizes": [1], "threads": 1, "latency": True, "runs": runs},
         "publish": {"when": "gates-pass"}}
    if serve:
        d["serve"] = {"check": False, "budget_p99_ms": SERVE_BUDGET_P99_MS, "concurrency": [1, 2],
                      "window_ms": 400, "space": "small"}
    return {"version": 1, "repository": str(repo), "defaults": d,
            "models": [{"name": "cnn", "source": str(onnx),
                        "targets": ["cpu", {"name": "cpu-int8", "tolerance": {"min_cosine": 0.95, "min_top1": 0.5}}]}]}


def _read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, TypeError):
        return {}


def _find(d, key: str):
    """The first dict holding ``key`` anywhere in a report (the optimizer's thread sweep)."""
    if isinstance(d, dict):
        if key in d:
            return d
        vals = d.values()
    elif isinstance(d, list):
        vals = d
    else:
        return None
    for v in vals:
        got = _find(v, key)
        if got is not None:
            return got
    return None


def run_record(summary: dict) -> dict:
    """What one pipeline run decided, per target: published or not, the gates' raw outcomes, the extra
    timing undecided gates took, and the serving configuration chosen (and whether it was undecided)."""
    targets = {}
    for t in summary.get("targets") or []:
        st = t.get("stages") or {}
        val = st.get("validate") or {}
        rep = _read_json(val.get("report")) if val.get("report") else {}
        lat = (rep.get("data") or rep).get("latency") or {}
        gates = {n: d.get("outcome") for b in (lat.get("decisions") or {}).values() for n, d in b.items()}
        extra = [float(x) for x in (lat.get("extra_timing_s") or {}).values()]
        load = (st.get("serve") or {}).get("load") or {}
        srep = _read_json(load.get("report")) if load.get("report") else {}
        sdec = (srep.get("decision") or {}).get("outcome")
        ch = load.get("chosen") or {}
        # the serving default's thread count: the optimizer's 1-vs-all-threads decision (ONNX metadata)
        sweep = _find(_read_json((st.get("optimize") or {}).get("report")), "best_intra_op_threads") or {}
        swd = [m.get("decision_vs_1", {}).get("outcome") for m in (sweep.get("measured") or {}).values()]
        targets[f"{t['model']}/{t['target']}"] = {
            "status": t.get("status"), "published": (t.get("published") or {}).get("status") == "ok",
            "gates": gates, "undecided": any(o == "undecided" for o in gates.values()), "extra_timing_s": extra,
            "serving": json.dumps(ch.get("config"), sort_keys=True) if ch else None, "serving_label": ch.get("label"),
            "serving_kept": bool(load.get("kept_published")), "serving_decision": sdec,
            "serving_undecided": sdec == "undecided",
            "threads": sweep.get("best_intra_op_threads"), "threads_why": sweep.get("why"),
            "threads_undecided": "undecided" in swd,
            "machine_busy": bool(((val.get("summary") or {}).get("machine_busy")))}
    return targets


def flips(runs: Sequence[dict]) -> dict:
    """Each run's targets against the first run's. A ``published`` status or a chosen ``serving``
    configuration that differs is a flip, unless either run reported that decision undecided (a gate,
    or the serve step's comparison with the published configuration): then it is a ``reported`` change.
    The serving default's thread count comes from the optimizer's 1-vs-all-threads decision, so a
    changed ``threads`` is listed as the cause (not counted again); a serving change that follows
    from a thread count either run could not decide is reported, not a flip."""
    out = {"flips": 0, "reported": 0, "compared": 0, "threads_changed": 0, "details": []}
    if not runs:
        return out
    base = runs[0]["targets"]
    for i, r in enumerate(runs[1:], 1):
        for key, t in r["targets"].items():
            b = base.get(key)
            if b is None:
                continue
            threads_undecided = bool(t.get("threads_undecided") or b.get("threads_undecided"))
            if t.get("threads") != b.get("threads"):
                out["threads_changed"] += 1
                out["details"].append({"run": i, "phase": r.get("phase"), "target": key, "aspect": "threads",
                                       "first": b.get("threads"), "this": t.get("threads"),
                                       "kind": "cause (undecided)" if threads_undecided else "cause (decided)",
                                       "why": t.get("threads_why")})
            for aspect, excuse, shown in (("published", "undecided", "published"),
                                          ("serving", "serving_undecided", "serving_label")):
                out["compared"] += 1
                if t.get(aspect) == b.get(aspect):
                    continue
                reported = bool(t.get(excuse) or b.get(excuse)) or (
                    aspect == "serving" and threads_undecided and t.get("threads") != b.get("threads"))
                out["reported" if reported else "flips"] += 1
                out["details"].append({"run": i, "phase": r.get("phase"), "target": key, "aspect": aspect,
                                       "first": b.get(shown), "this": t.get(shown),
                                       "kind": "reported undecided" if reported else "FLIP"})
    return out


def cost(runs: Sequence[dict]) -> dict:
    """Extra timing that undecided gates triggered: over the cases that measured more, and in all."""
    from bench.stats import summarize

    all_ = [x for r in runs for t in r["targets"].values() for x in t["extra_timing_s"]]
    more = [x for x in all_ if x > 0]
    out = {"gate_batches": len(all_), "measured_more": len(more), "total_s": round(sum(all_), 3)}
    if more:
        out["extra_s"] = summarize(more, unit="s")
        out["median_s"], out["max_s"] = out["extra_s"]["median"], out["extra_s"]["max"]
    else:
        out["median_s"] = out["max_s"] = 0.0
    return out


def _serve_available() -> bool:
    try:
        import retool.serve.session  # noqa: F401
    except ImportError:
        return False
    return True


def stability(onnx: Path, work: Path, per_phase: int, runs_per_validate: int) -> dict:
    import retool

    serve = _serve_available()
    runs = []
    order = [ph for _ in range(per_phase) for ph in ("quiet", "loaded")]
    for i, phase in enumerate(order):
        d = work / f"run{i}-{phase}"
        doc = pipeline_doc(onnx, d / "repo", runs_per_validate, serve)
        print(f"   pipeline run {i + 1}/{len(order)} ({phase})", flush=True)
        ctx = cpu_hog() if phase == "loaded" else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx:
            b = _block()
            res = retool.run(doc, out=d / "out", use_cache=False)
            state = _state(b)
        summary = _read_json(res.summary_json)
        runs.append({"phase": phase, "exit_code": res.exit_code, "seconds": round(time.perf_counter() - t0, 1),
                     "machine": state, "targets": run_record(summary)})
        shutil.rmtree(d, ignore_errors=True)  # the record holds what is compared
    return {"serve_step": serve, "runs": runs, "stability": flips(runs), "cost": cost(runs)}


# -- the section ---------------------------------------------------------------------------------------

def _prepare(work: Path) -> dict:
    from bench.proc import child_failure as _child_failure, convert as _convert

    work.mkdir(parents=True, exist_ok=True)
    dst = work / "cnn.onnx"
    r, _ = _convert(SOURCE, [], dst, timeout=900)
    if not r.ok:
        return _child_failure(r, "retool convert")
    return {"status": "ok", "onnx": dst}


def decisions(settings: dict, work: Path) -> dict:
    try:
        from retool import machine  # noqa: F401
        from retool.speed import paired_ratio_interval  # noqa: F401
        from retool.validators.latency import measure_interleaved  # noqa: F401
    except ImportError as exc:
        return {"status": "skipped", "reason": f"retool's decision rule is missing: {exc}"}
    quick = bool(settings.get("quick"))
    k, seconds = (40, 0.25) if quick else (100, 1.0)
    per_phase, vruns = (1, 20) if quick else (3, 50)
    _, hog = hog_command(len(os.sched_getaffinity(0)))
    out: dict = {"model": f"{SOURCE} as ONNX, 1 intra-op thread", "hog": hog, "goal_honesty": HONESTY_GOAL,
                 "pairs_per_phase": k, "seconds_per_pair": seconds}
    prep = _prepare(work)
    if prep["status"] != "ok":
        return {**out, **prep}
    try:
        print(f"   interval honesty: {k} identical pairs quiet, {k} beside the hog ({hog})", flush=True)
        out["honesty"] = interval_honesty(prep["onnx"], k, seconds)
        print(f"   decision stability: the pipeline {per_phase}x quiet, {per_phase}x beside the hog", flush=True)
        out["pipeline"] = stability(prep["onnx"], work, per_phase, vruns)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    h = out["honesty"]
    out["meets_goal"] = all(h[p][f"honesty_{w}"]["meets_goal"] for p in ("quiet", "loaded") for w in ("wall", "cpu"))
    return out


def _pct(h: dict) -> str:
    if h.get("fraction") is None:
        return "-"
    if "rule_says_same" not in h:  # a result file from before the rule's figure
        return f"CI has 1: {h['contain_1']}/{h['pairs']}"
    return f"{h['rule_says_same']}/{h['pairs']} (CI has 1: {h['contain_1']}, median {h['median_estimate']:.3f})"


def _load(m: dict) -> str:
    from retool.machine import describe

    return describe(m) if m else ""


def render(d: dict) -> str:
    from bench.stats import fmt_metric as _m
    from retool.console import table

    def _table(headers, rows):
        return table(headers, [[str(c) for c in r] for r in rows])

    if d.get("status") not in (None, "ok"):
        return f"decisions: {d.get('status')}: {d.get('reason')}"
    lines = [f"{d['model']}; hog: {d['hog']}; {d['pairs_per_phase']} pairs x {d['seconds_per_pair']:g} s per phase"]
    h = d.get("honesty") or {}
    rows = []
    for ph in ("quiet", "loaded"):
        p = h.get(ph)
        if not p:
            continue
        ns = p["not_slower_first_measurement"]
        rows.append([ph, _pct(p["honesty_wall"]), _pct(p["honesty_cpu"]), _m(p["wall_ms"]), _m(p["cpu_ms"]),
                     f"{ns['pass']}/{ns['undecided']}/{ns['fail']}",
                     f"{'BUSY ' if p['machine'].get('busy') else ''}load {p['machine'].get('loadavg')}, others "
                     f"{p['machine'].get('others_cpu_pct')}%"])
    lines.append(f"interval honesty (same file loaded twice per pair; goal: the rule calls >= "
                 f"{100 * d['goal_honesty']:.0f}% of them the same)")
    lines.append(_table(["phase", "wall: same", "thread cpu: same", "wall ms", "thread cpu ms",
                         "not-slower p/u/f", "machine"], rows))
    lr = h.get("load_robust") or {}
    if lr:
        lines.append(f"load-robust, loaded/quiet per pair (median [IQR]): p50 wall {_m(lr['wall_loaded_over_quiet'], '{:.2f}')}"
                     f", thread CPU {_m(lr['cpu_loaded_over_quiet'], '{:.2f}')}"
                     + (f"; p90 wall {_m(lr['wall_p90_loaded_over_quiet'], '{:.2f}')}, thread CPU "
                        f"{_m(lr['cpu_p90_loaded_over_quiet'], '{:.2f}')}" if "wall_p90_loaded_over_quiet" in lr else ""))
    p = d.get("pipeline") or {}
    if p:
        rows = []
        for i, r in enumerate(p["runs"]):
            for key, t in r["targets"].items():
                rows.append([str(i), r["phase"], key, "yes" if t["published"] else "no",
                             ",".join(f"{n}={o}" for n, o in t["gates"].items()) or "-",
                             f"{t.get('threads') or '-'}" + (" (undecided)" if t.get("threads_undecided") else ""),
                             (t["serving_label"] or "-") + (" (kept)" if t["serving_kept"] else ""),
                             "+".join(f"{x:.1f}" for x in t["extra_timing_s"]) or "0",
                             "BUSY" if r["machine"].get("busy") else "", ])
        lines.append("decision stability (each run against run 0)")
        lines.append(_table(["run", "phase", "target", "published", "gates", "threads", "serving", "extra s",
                                   "machine"], rows))
        s, c = p["stability"], p["cost"]
        lines.append(f"flips: {s['flips']}; changes reported undecided: {s['reported']} (of {s['compared']} compared; "
                     f"thread count changed {s.get('threads_changed', 0)}x)"
                     + "".join(f"\n  {x['kind']}: run {x['run']} {x['target']} {x['aspect']}: {x['first']} -> {x['this']}"
                               + (f" ({x['why']})" if x.get("why") else "") for x in s["details"]))
        lines.append(f"cost: {c['measured_more']} of {c['gate_batches']} gate batches measured more; extra s median "
                     f"{c['median_s']:g}, max {c['max_s']:g}, total {c['total_s']:g}")
    return "\n".join(lines)


if __name__ == "__main__":  # python bench/sec_decisions.py WORKDIR [--quick]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    res = decisions({"quick": "--quick" in sys.argv}, Path(sys.argv[1]))
    print(json.dumps(res, indent=1, default=str))
    print(render(res))
