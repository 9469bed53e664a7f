"""Bench section ``plan``: the serving plan on a ResNet-18-sized family (fp32 and cpu-int8 from one source).

Three figures (issue 20), each with its spread:

- **served / in-process**: the plan's choice, its sustainable rate within the budget (the bracket the
  plan measured) over in-process onnxruntime's throughput of the same artifact at its best batch, same
  threads, same run (median time of validate's interleaved loop, with its bootstrap interval). Goal >= 0.9;
  the stand-in Python backend's cost is part of the figure and is reported, not hidden.
- **stability**: two plans in a row on the unchanged repository choose the same variant and configuration,
  or report the two as tied within noise.
- **replica check**: a separate perf_analyzer run at the planned per-replica rate (Poisson arrivals, three
  runs) meets the budget.
- **per variant** (issue 24): the same served / in-process figure for the fp32 and the int8 variant, each at
  its best measured configuration (the highest sustainable rate the plan found for it), so the int8 build's
  gain is read where it is paid for: served within the budget, not only in-process. A variant with no rate
  within the budget is listed with the plan's reason (over budget by X ms, fell behind).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from bench.sec_serving import _prepare

BUDGET_P99_MS = 60.0
RATE = 100.0
GOAL = 0.9


def _inprocess(model: Path, threads: int, feeds_one: dict, seconds: float) -> dict:
    """Inferences/s of onnxruntime in this process at its best batch of 1/2/4/8, timed by validate's own
    interleaved loop; the interval is the bootstrap interval of the batch's median time."""
    import numpy as np

    from retool import speed
    from retool.runtime import make_session, run_session
    from retool.validators.latency import Plan, measure_interleaved

    s = make_session(str(model), threads=threads)
    feeds = {b: {k: np.repeat(v[:1], b, axis=0) for k, v in feeds_one.items()} for b in (1, 2, 4, 8)}
    times = measure_interleaved({b: (lambda f=f: run_session(s, f)) for b, f in feeds.items()},
                                Plan(runs=None, time_budget_s=seconds, warmup=3, min_runs=10, max_runs=100_000))
    best: dict = {}
    for b, ms in times.items():
        med, lo, hi = speed.sample_interval(ms)
        tput = {"batch": b, "median": b * 1000 / med, "min": b * 1000 / hi, "max": b * 1000 / lo, "runs": len(ms)}
        if not best or tput["median"] > best["median"]:
            best = tput
    return best


def _best_per_variant(plan: dict) -> dict:
    """model -> its candidate with the highest sustainable rate (the plan's own measurements)."""
    best: dict = {}
    for c in plan.get("candidates") or ():
        sr = c.get("sustainable_rate")
        if sr and (c["model"] not in best or sr["value"] > best[c["model"]]["sustainable_rate"]["value"]):
            best[c["model"]] = c
    return best


def _served_vs_inprocess(repo, model: str, version: int, config: dict, sustainable: dict, cores: int,
                         seconds: float) -> dict:
    """The sustainable rate's bracket over in-process onnxruntime's best-batch throughput, same artifact and
    threads; the interval spans both figures' spreads."""
    from retool.serve import samples as smp

    man = repo.manifest(model, version)
    ins = smp.load(repo.storage.read_bytes(f"{model}/{version}/{man['samples']['file']}"))["in"]
    local = Path(repo.storage.location(f"{model}/{version}/model.onnx"))
    threads = config.get("intra_op_thread_count") or cores
    inproc = _inprocess(local, threads, ins, seconds)
    lo, hi = sustainable["interval"]
    return {"threads": threads, "inprocess": inproc, "_samples": ins,
            "served_vs_inprocess": {"value": round(lo / inproc["median"], 3),
                                    "interval": [round(lo / inproc["max"], 3), round(hi / inproc["min"], 3)]}}


def plan(settings: dict, work: Path) -> dict:
    try:
        from retool.publish import open_repo
        from retool.serve import loadtest as lt
        from retool.serve.plan import PlanInputs
        from retool.serve.planner import _replica_session, run
        from retool.serve.tune import cores
    except ImportError as exc:
        return {"status": "skipped", "reason": f"retool[serve] not installed: {exc}"}
    quick = settings.get("quick")
    prep = _prepare(work)
    if prep["status"] != "ok":
        return prep
    repo_url = prep["repo"]
    n = cores()
    inp = PlanInputs(BUDGET_P99_MS, RATE, 0.10, "USD", n, 0.7, "realtime", 600 if quick else 1000, "small")
    out: dict = {"budget_p99_ms": BUDGET_P99_MS, "rate": RATE, "goal_served_vs_inprocess": GOAL,
                 "cores": n, "loadavg_before": round(os.getloadavg()[0], 2)}
    plans = [run(repo_url, "resnet18-fp32", inp) for _ in range(2)]
    out["plans"] = [{"chosen": (p.get("chosen") or {}).get("model"), "label": (p.get("chosen") or {}).get("label"),
                     "sustainable_rate": (p.get("chosen") or {}).get("sustainable_rate"),
                     "replicas": (p.get("chosen") or {}).get("replicas"), "ranking": p.get("ranking"),
                     "seconds": p.get("seconds")} for p in plans]
    a, b = (p.get("chosen") or {} for p in plans)
    same = (a.get("model"), a.get("config")) == (b.get("model"), b.get("config"))
    tied = any("tied within noise" in r["why"] for p in plans for r in (p.get("ranking") or ())
               if {a.get("label"), b.get("label")} & {r["label"].split(": ", 1)[-1]})
    out["stability"] = "same choice" if same else ("tied within noise (reported)" if tied else "FLIPPED")
    ch = plans[-1].get("chosen")
    if not ch:
        return {**out, "status": "budget not met", "closest": plans[-1].get("closest")}
    repo = open_repo(repo_url)
    seconds = 4.0 if quick else 12.0
    mine = _served_vs_inprocess(repo, ch["model"], ch["version"], ch["config"], ch["sustainable_rate"], n, seconds)
    ins = mine.pop("_samples")
    lo, hi = ch["sustainable_rate"]["interval"]
    threads = mine["threads"]
    out["inprocess"] = {**mine["inprocess"], "threads": threads}
    out["served_vs_inprocess"] = mine["served_vs_inprocess"]
    out["meets_goal"] = out["served_vs_inprocess"]["interval"][0] >= GOAL
    out["per_variant"] = {}
    for model, c in _best_per_variant(plans[-1]).items():
        if model == ch["model"] and c["config"] == ch["config"]:
            out["per_variant"][model] = {"label": c["label"], "sustainable_rate": c["sustainable_rate"], **mine}
            continue
        r = _served_vs_inprocess(repo, model, c["version"], c["config"], c["sustainable_rate"], n, seconds)
        r.pop("_samples")
        out["per_variant"][model] = {"label": c["label"], "sustainable_rate": c["sustainable_rate"], **r}
    rejected = plans[-1].get("rejected") or ()
    for rej in rejected:  # a variant with no rate at all within the budget says why
        if rej["model"] not in out["per_variant"]:
            n_rej = sum(r["model"] == rej["model"] for r in rejected)
            out["per_variant"][rej["model"]] = {"label": rej.get("label"), "configurations_rejected": n_rej,
                                                "reason": rej.get("reason")}
    # replica check: a fresh server, the planned per-replica rate, three Poisson runs
    from retool.serve.plan import Candidate, family, probe_rate
    from retool.serve.planner import measure_at
    from retool.serve.profile import ServingConfig

    variant = next(v for v in family(repo, ch["model"])[0] if v.model == ch["model"])
    cand = Candidate(variant, ServingConfig.from_dict(ch["config"]), sustainable=(lo, hi), cores=n)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, _replica_session(repo_url, n) as sess:
        data = lt.input_data_file(ins, Path(tmp), batched=variant.max_batch_size > 0)
        pts = measure_at(sess, repo, cand, probe_rate(cand, inp), inp, data, runs=3)
    p99s = [p.p99_ms for p in pts]
    from retool.speed import decide_sample

    d = decide_sample(p99s, BUDGET_P99_MS, higher_is_better=False)
    out["replica_check"] = {"rate": probe_rate(cand, inp), "p99_ms": p99s, "outcome": d.outcome, "decision": d.to_dict()}
    out["loadavg_after"] = round(os.getloadavg()[0], 2)
    return out


def render(d: dict) -> str:
    if d.get("status") not in (None, "ok"):
        return f"plan: {d.get('status')}: {d.get('reason') or d.get('closest')}"
    s = d.get("served_vs_inprocess") or {}
    rc = d.get("replica_check") or {}
    lines = [f"budget p99 <= {d['budget_p99_ms']:g} ms at {d['rate']:g} req/s on {d['cores']} core(s); load "
             f"{d.get('loadavg_before')} -> {d.get('loadavg_after')}",
             f"choice: {d['plans'][-1]['chosen']} {d['plans'][-1]['label']}; stability over 2 plans: {d['stability']}",
             f"served/in-process: {s.get('value')} [{(s.get('interval') or ['-', '-'])[0]}-"
             f"{(s.get('interval') or ['-', '-'])[1]}] (goal >= {d['goal_served_vs_inprocess']}; in-process best batch "
             f"{(d.get('inprocess') or {}).get('batch')} at {(d.get('inprocess') or {}).get('median', 0):.0f}/s)",
             f"replica check at {rc.get('rate')} req/s: p99 {rc.get('p99_ms')} ms: {rc.get('outcome')}"]
    for model, v in (d.get("per_variant") or {}).items():
        if "served_vs_inprocess" not in v:
            lines.append(f"  {model}: no rate within the budget in any of {v.get('configurations_rejected')} "
                         f"configuration(s); {v.get('label')}: {v.get('reason')}")
            continue
        sv, ip = v["served_vs_inprocess"], v["inprocess"]
        lines.append(f"  {model} at its best ({v['label']}): sustainable {v['sustainable_rate']['interval']} req/s, "
                     f"in-process {ip['median']:.0f}/s at batch {ip['batch']}: served/in-process {sv['value']} "
                     f"[{sv['interval'][0]}-{sv['interval'][1]}]")
    return "\n".join(lines)


if __name__ == "__main__":  # python bench/sec_plan.py WORKDIR [--quick]
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    res = plan({"quick": "--quick" in sys.argv}, Path(sys.argv[1]))
    print(json.dumps(res, indent=1))
    print(render(res))
