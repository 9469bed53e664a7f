"""The benchmark sections. Each is ``f(settings, work_dir) -> dict`` and never raises on a missing retool part.

Memory figures come from one child process per measurement (``bench.proc``);
latency figures from interleaved loops inside one child (``bench.child``).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from bench.machine import room_for
from bench.models import MODELS, BenchModel, LARGE_DEPTH, LARGE_WIDTH, mlp_param_count
from bench.proc import PY, ChildResult, child_failure, convert as _convert, retool_cmd, run_child, run_task
from bench.stats import ratio_summary, summarize, value
from bench.sec_decoder import decoder  # noqa: F401  (section "decoder")

MIB = 2**20
def _task(task: str, args: dict, timeout: float, env: dict | None = None) -> dict:
    r, got = run_task(task, args, timeout=timeout, env=env)
    if got is None or not r.ok:
        return child_failure(r, f"bench task {task}")
    return got


def _threads_env(threads: int) -> dict:
    # PASSIVE: torch's OpenMP workers sleep instead of spinning, as retool's ORT sessions do
    # (spinning on a busy 2-core machine made a 0.3 ms torch CNN take 50-80 ms).
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}


# -- CLI cold start -------------------------------------------------------------------------------

def cold_start(settings: dict, work: Path) -> dict:
    """Fresh processes of the two commands a user runs first; interleaved, after one warm-up each."""
    base = retool_cmd()
    cmds = {"retool --help": base + ["--help"], "retool convert --help": base + ["convert", "--help"]}
    n = settings["cold_start_repeats"]
    walls: dict[str, list[float]] = {k: [] for k in cmds}
    rss: dict[str, list[float]] = {k: [] for k in cmds}
    for k, c in cmds.items():  # warm the page cache: the figure is start-up, not disk
        r = run_child(c, timeout=120)
        if not r.ok:
            return child_failure(r, k)
    for _ in range(n):
        for k, c in cmds.items():
            r = run_child(c, timeout=120)
            if not r.ok:
                return child_failure(r, k)
            walls[k].append(r.wall_s)
            rss[k].append(r.maxrss_bytes / MIB)
    return {"runner": " ".join(Path(b).name if i == 0 else b for i, b in enumerate(base)),
            "commands": {k: {"wall": summarize(walls[k]), "peak_rss_mib": summarize(rss[k], unit="MiB")}
                         for k in cmds}}


# -- per fixture model -----------------------------------------------------------------------------

def _prepare(bm: BenchModel, work: Path) -> dict:
    if bm.source:
        return {"status": "ok", "source": bm.source, "convert_args": list(bm.convert_args)}
    got = _task(bm.prepare, {"dir": str(work)}, timeout=600)
    if got.get("status") == "ok":
        got["convert_args"] = list(got.get("convert_args", [])) + list(bm.convert_args)
    return got


def _onnx_size(path: Path) -> int:
    """The ONNX file plus every other file written beside it (external data)."""
    return sum(p.stat().st_size for p in path.parent.iterdir()
               if p.is_file() and (p == path or p.name.startswith(path.stem + ".")) and not p.name.endswith(".json"))


def _weights_arg(extra: list[str]) -> str | None:
    return extra[extra.index("--weights") + 1] if "--weights" in extra else None


def one_model(bm: BenchModel, settings: dict, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"framework": bm.framework, "note": bm.note}
    prep = _prepare(bm, work)
    if prep.get("status") != "ok":
        return {**res, **prep}
    source, extra = prep["source"], prep["convert_args"]
    res["source"] = source if bm.source else Path(source).name

    walls, rsss, fp32, timings = [], [], None, None
    for i in range(settings["convert_repeats"]):
        d = work / f"convert{i}"
        d.mkdir()
        dst = d / f"{bm.name}.onnx"
        r, report = _convert(source, extra, dst)
        if not r.ok:
            return {**res, **child_failure(r, "retool convert")}
        walls.append(r.wall_s)
        rsss.append(r.maxrss_bytes / MIB)
        if fp32 is None:
            fp32 = dst
            timings = (report or {}).get("data", {}).get("timings")
        else:
            shutil.rmtree(d)
    res["convert"] = {"wall": summarize(walls), "peak_rss_mib": summarize(rsss, unit="MiB"),
                      "size_bytes": _onnx_size(fp32), "stage_timings_first_run": timings}
    threads = settings["threads"]
    common = {"threads": threads, "batches": settings["batches"], "budget_s": settings["latency_budget_s"],
              "min_rounds": settings["latency_min_rounds"], "warmup": settings["latency_warmup"]}
    print(f"   {bm.name}: converted in {summarize(walls)['median']:.1f} s; timing vs source", flush=True)
    res["vs_source"] = _task("source_latency", {**common, "framework": bm.framework, "source": source,
                                                "weights": _weights_arg(extra), "onnx": str(fp32)},
                             timeout=900, env=_threads_env(threads))
    if isinstance(res["vs_source"], dict):
        res["vs_source"]["env"] = _threads_env(threads)
    if settings["targets"]:
        print(f"   {bm.name}: optimising for {len(settings['targets'])} targets", flush=True)
        tdir = work / "targets"
        tdir.mkdir()
        res["targets"] = _task("targets", {**common, "onnx": str(fp32), "out_dir": str(tdir),
                                           "targets": settings["targets"],
                                           "parity_samples": max(8, int(bm.parity_samples * settings["parity_scale"]))},
                               timeout=1800, env=_threads_env(threads))
    return res


def models(settings: dict, work: Path) -> dict:
    out = {"threads": settings["threads"], "batches": settings["batches"], "models": {}}
    for bm in MODELS:
        if bm.name not in settings["models"]:
            continue
        print(f" - {bm.name}", flush=True)
        try:
            out["models"][bm.name] = one_model(bm, settings, work / bm.name)
        except Exception as exc:  # record, then go on to the next model
            import traceback

            out["models"][bm.name] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc()[-2000:]}
        finally:
            shutil.rmtree(work / bm.name, ignore_errors=True)
        out["models"][bm.name].setdefault("status", "ok")
    return out


# -- large model -----------------------------------------------------------------------------------

LARGE_GOAL = 1.5


def _rss_stage(r: ChildResult, size: int, floor: int | None, **more) -> dict:
    out = {"wall_s": value(r.wall_s, "s"), "peak_rss_bytes": r.maxrss_bytes,
           "rss_over_model_size": value(r.maxrss_bytes / size, "x", digits=3),
           "meets_goal": r.maxrss_bytes / size <= LARGE_GOAL, **more}
    if floor:  # the memory the model itself costs, above what importing the frameworks costs
        out["above_floor_over_model_size"] = round((r.maxrss_bytes - floor) / size, 3)
    return out


def large_model(settings: dict, work: Path) -> dict:
    """A wide MLP over 2 GiB through convert and ``cpu`` optimisation; peak RSS of each step / model size."""
    spec = settings.get("large_mlp")
    width, depth = (int(v) for v in spec.split("x")) if spec else (LARGE_WIDTH, LARGE_DEPTH)
    expect = mlp_param_count(width, depth) * 4
    res: dict = {"model": f"wide MLP 1024 -> {depth + 1} x {width} -> 1000 (torch factory bench.models:wide_mlp)",
                 "params": mlp_param_count(width, depth), "goal_rss_over_size": LARGE_GOAL}
    work.mkdir(parents=True, exist_ok=True)
    why = room_for(work, 4 * expect, 3 * expect, "fp32 model, a copy, the cpu variant, staging", "the large model")
    if why:
        return {**res, "status": "skipped", "reason": why}
    env = {"RETOOL_BENCH_MLP": f"{width}x{depth}"}
    try:
        # What any retool process costs before it holds a model: the floor under every figure below.
        floor = run_child([PY, "-c", "import torch, onnx, onnxruntime, numpy, retool.converter.core"], timeout=300)
        floor = floor.maxrss_bytes if floor.ok else None
        res["import_floor_rss_bytes"] = floor

        src_dir, big = work / "torch", work / "torch" / "wide_mlp.onnx"
        src_dir.mkdir()
        print(f"   converting the {expect / 1e9:.2f} GB MLP from torch", flush=True)
        r, report = _convert("bench.models:wide_mlp", [], big, timeout=1800, env=env)
        if not r.ok:
            return {**res, **child_failure(r, "retool convert (torch source)")}
        size = _onnx_size(big)
        res["model_size_bytes"] = size
        res["external_data"] = sorted(p.name for p in src_dir.iterdir() if p != big and not p.name.endswith(".json"))
        res["stages"] = {"convert_torch": _rss_stage(r, size, floor, note="source model, exporter, ORT check and "
                                                                   "parity run in one process")}

        # The same model given as ONNX: retool's own overhead without the torch copy of the weights.
        copy_dir = work / "onnx"
        copy_dir.mkdir()
        print("   converting it again from its ONNX file", flush=True)
        r, _ = _convert(str(big), [], copy_dir / "wide_mlp.onnx", timeout=1800)
        res["stages"]["convert_onnx"] = (_rss_stage(r, size, floor, note="ONNX source: structural checks, ORT load, parity")
                                         if r.ok else child_failure(r, "retool convert (onnx source)"))
        shutil.rmtree(copy_dir, ignore_errors=True)

        print("   optimising for cpu", flush=True)
        opt_dir = work / "cpu"
        opt_dir.mkdir()
        r, got = run_task("optimize_one", {"onnx": str(big), "out": str(opt_dir / "wide_mlp.cpu.onnx"),
                                           "target": "cpu", "threads": settings["threads"]}, timeout=1800)
        if got is not None and got.get("status") == "skipped":
            res["stages"]["optimize_cpu"] = got
        elif r.ok and got is not None and got.get("status") == "ok":
            res["stages"]["optimize_cpu"] = _rss_stage(r, size, floor, output_size_bytes=got.get("size_bytes"))
        else:
            res["stages"]["optimize_cpu"] = got if got and got.get("status") == "error" else child_failure(r, "optimize cpu")
        print("   publishing it signed and unsigned, verifying it with and without signatures", flush=True)
        from bench.sec_signing import sign_and_verify  # issue 25's figure: verify --trust-key vs hashing once

        res["signing"] = {"model": "the torch-converted MLP",
                          **sign_and_verify(big, work / "signing", settings.get("signing_repeats", 5))}
        from bench import sec_large_tf  # the TensorFlow case: a Keras MLP of the same shape

        res["tensorflow"] = sec_large_tf.convert_tf(settings, work / "tf", _rss_stage, _convert, _onnx_size)
        res["stages"]["convert_tf"] = res["tensorflow"].pop("stage", None) or {
            k: res["tensorflow"].get(k) for k in ("status", "reason")}
        worst = [s["rss_over_model_size"]["value"] for s in res["stages"].values() if "rss_over_model_size" in s]
        res["worst_rss_over_size"] = max(worst) if worst else None
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- pipeline overhead ------------------------------------------------------------------------------

PIPELINE_GOAL = 1.1


def pipeline(settings: dict, work: Path) -> dict:
    """``retool run`` (one model, one target) vs the bare convert + optimize + validate calls, alternating."""
    args = {"source": "fixtures.torch_models:cnn", "target": "cpu-int8", "threads": settings["threads"]}
    res: dict = {"model": "torch-cnn", "target": args["target"], "goal_ratio": PIPELINE_GOAL,
                 "pipeline": "retool.run(config) in a fresh process; the bare calls in another"}
    runs, bares, run_walls, bare_walls, steps, run_steps = [], [], [], [], [], []
    work.mkdir(parents=True, exist_ok=True)
    try:
        for i in range(settings["pipeline_repeats"]):
            order = [("pipeline_run", runs, run_walls), ("pipeline_bare", bares, bare_walls)]
            for task, inproc, walls in (order if i % 2 == 0 else order[::-1]):
                out = work / f"{task}{i}"
                r, got = run_task(task, {**args, "out": str(out)}, timeout=1200)
                shutil.rmtree(out, ignore_errors=True)
                if got is None or not r.ok:
                    return {**res, **child_failure(r, f"bench task {task}")}
                if got.get("status") != "ok":
                    return {**res, **got}
                inproc.append(got["wall_s"])
                walls.append(r.wall_s)
                (steps if task == "pipeline_bare" else run_steps).append(got.get("steps") or {})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res.update({
        "run_s": summarize(runs), "bare_sum_s": summarize(bares),
        "ratio": ratio_summary(runs, bares),
        "process_ratio": ratio_summary(run_walls, bare_walls),
        "bare_steps_s": {k: summarize([s[k] for s in steps]) for k in steps[0]},
    })
    if run_steps and all(run_steps):
        keys = set.intersection(*(set(s) for s in run_steps))
        res["run_steps_s"] = {k: summarize([s[k] for s in run_steps]) for k in sorted(keys)}
        # What retool run spends outside its stages: worker start-up, cache hashing, scheduling, summaries.
        res["run_outside_stages_s"] = summarize([w - sum(s[k] for k in keys) for w, s in zip(runs, run_steps)])
    res["meets_goal"] = res["ratio"]["median"] <= PIPELINE_GOAL
    return res


from bench.sec_serving import serving  # noqa: E402,F401  (section "serving": a real Triton)
from bench.sec_plan import plan  # noqa: E402,F401  (section "plan": the serving plan's figures)
from bench.sec_peers import peers  # noqa: E402,F401  (section 'peers': retool vs plain onnxruntime.quantization)
from bench.sec_decisions import decisions  # noqa: E402,F401  (section "decisions": issue 22's figures)
from bench.sec_signing import signing  # noqa: E402,F401  (section "signing": issue 25's figure alone)
