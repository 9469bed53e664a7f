"""Measurements that run in a fresh interpreter: ``python bench/child.py TASK 'JSON ARGS'``.

Each task prints its result as one JSON line, last on stdout. A missing part
of retool (module not built yet) is reported as ``{"status": "skipped", "reason": ...}``,
never as a crash, so ``bench/run.py`` can record it and carry on.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

from bench.stats import interleaved, ratio_summary, summarize  # noqa: E402

#: Size given to every symbolic non-batch axis (the transformer's sequence length).
DYNAMIC_DIM = 32


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def failed(exc: BaseException) -> dict:
    from retool.errors import MissingDependency

    if isinstance(exc, MissingDependency):  # an extra not installed: no figure, not a failure
        return skipped(str(exc))
    return {"status": "error", "reason": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ''}",
            "traceback": traceback.format_exc()[-2000:]}


def set_threads(framework: str, threads: int) -> None:
    """Fix the source framework's thread pools before it starts any work."""
    if framework == "torch":
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set in this process
            pass
    elif framework == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    elif framework == "caffe":
        import cv2

        cv2.setNumThreads(threads)


def feeds_for(specs, batch: int, seed: int) -> dict:
    from retool.inputs import random_feeds

    sizes = {d: DYNAMIC_DIM for s in specs for d in s.shape[1:] if isinstance(d, str)}
    feeds = random_feeds(specs, batch=batch, seed=seed, sizes=sizes)
    for s in specs:  # unnamed dynamic axes (None) get the same size
        a = feeds[s.name]
        if a.ndim > 1 and any(d is None for d in s.shape[1:]):
            shape = [batch] + [DYNAMIC_DIM if d is None else a.shape[i + 1] for i, d in enumerate(s.shape[1:])]
            feeds[s.name] = random_feeds([type(s)(s.name, s.dtype, tuple(shape))], batch=batch, seed=seed)[s.name]
    return feeds


def model_size(path) -> int:
    from retool.fsutil import external_data_files, file_size

    return file_size(path, external_data_files(path))


# -- tasks --------------------------------------------------------------------------------------

def prepare_keras(args: dict) -> dict:
    try:
        from fixtures import tf_models
    except ImportError as exc:
        return skipped(f"fixtures.tf_models not importable ({exc})")
    path = tf_models.save_keras(tf_models.sequential_cnn(), Path(args["dir"]) / "keras-cnn.keras")
    return {"status": "ok", "source": str(path), "convert_args": []}


def prepare_caffe(args: dict) -> dict:
    """The classic classifier of examples/caffe_net.prototxt with seeded synthetic weights."""
    try:
        from fixtures import caffe_nets
    except ImportError as exc:
        return skipped(f"fixtures.caffe_nets not importable ({exc})")
    d = Path(args["dir"])
    example = ROOT / "examples" / "caffe_net.prototxt"
    if example.exists():
        proto = d / "caffe-net.prototxt"
        proto.write_text(example.read_text())
        weights = caffe_nets.write_caffemodel(proto, d / "caffe-net.caffemodel", seed=0)
    else:  # fall back to the fixture net that covers the most layer types
        proto, weights = caffe_nets.write_net("vision", d)
    return {"status": "ok", "source": str(proto), "convert_args": ["--weights", str(weights)]}


def source_latency(args: dict) -> dict:
    """The fp32 ONNX artifact under ORT vs the source framework, interleaved, same thread count."""
    from retool.converter.base import ConvertRequest
    from retool.onnx_info import artifact_from_onnx
    from retool.registry import CONVERTERS
    from retool.runtime import make_session, run_session

    threads, fw = int(args["threads"]), args["framework"]
    set_threads(fw, threads)
    art = artifact_from_onnx(args["onnx"])
    weights = args.get("weights")
    req = ConvertRequest(args["source"], Path(args["onnx"]).with_suffix(".unused.onnx"), fw,
                         Path(weights) if weights else None)
    src = CONVERTERS.get(fw).load(req)
    sess = make_session(args["onnx"], threads=threads)
    out = {"status": "ok", "threads": threads, "source_runner": f"{fw}: retool's parity reference "
           f"({type(src).__name__}.run)", "batches": {}}
    try:
        for b in args["batches"]:
            feeds = feeds_for(art.inputs, b, seed=1000 + b)
            ref_feeds = src.reference_feeds(feeds)
            a, o = src.run(ref_feeds), run_session(sess, feeds)
            diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(a, o))
            s = interleaved({"source": lambda: src.run(ref_feeds), "ort": lambda: run_session(sess, feeds)},
                            warmup=args.get("warmup", 2), min_rounds=args.get("min_rounds", 5),
                            budget_s=args.get("budget_s", 3.0))
            out["batches"][str(b)] = {
                "source_latency": summarize(s["source"]), "ort_latency": summarize(s["ort"]),
                "ort_over_source": ratio_summary(s["ort"], s["source"]), "max_abs_diff": diff}
    finally:
        src.close()
    return out


def _optimize(onnx_path: str, out_path: str, target: str, threads: int | None):
    from retool.optimizers.core import optimize
    from retool.registry import TARGETS

    # Latency is measured here, interleaved; only cpu-auto needs its own measurement to choose.
    measure = TARGETS.get(target).method == "auto"
    return optimize(onnx_path, out_path, target=target, threads=threads, measure=measure)


def on_target_hardware(target: str, provider: str) -> bool:
    """Every variant is timed on this machine's CPU: a GPU, NPU or ARM target's latency here is not its speed there."""
    import platform

    if provider != "CPUExecutionProvider" or target.startswith("npu"):
        return False
    if target.startswith("arm64"):
        return platform.machine().lower() in ("aarch64", "arm64")
    return True


def _parity(ref_outs: list[list[np.ndarray]], new_outs: list[list[np.ndarray]]) -> dict:
    """Cosine per output over all held-out samples, and top-1 agreement on the first class-score output."""
    cos, top1 = [], None
    for k in range(len(ref_outs[0])):
        r = np.concatenate([np.asarray(o[k], np.float64).reshape(len(o[k]), -1) for o in ref_outs])
        n = np.concatenate([np.asarray(o[k], np.float64).reshape(len(o[k]), -1) for o in new_outs])
        den = float(np.linalg.norm(r) * np.linalg.norm(n))
        cos.append(float(np.dot(r.ravel(), n.ravel()) / den) if den else (1.0 if not r.any() and not n.any() else 0.0))
        if top1 is None and r.shape[1] > 1:
            top1 = float(np.mean(np.argmax(r, axis=1) == np.argmax(n, axis=1)))
    return {"cosine_min": {"value": round(min(cos), 6), "unit": "", "better": "higher"},
            "top1_agreement": None if top1 is None else {"value": round(top1, 6), "unit": "", "better": "higher"},
            "cosine_per_output": [round(c, 6) for c in cos]}


def targets(args: dict) -> dict:
    """Optimise the fp32 model for each target, then time all variants interleaved and check parity."""
    try:
        import retool.optimizers.core  # noqa: F401
    except ImportError as exc:
        return skipped(f"retool.optimizers.core not importable yet ({exc})")
    from retool.onnx_info import artifact_from_onnx
    from retool.registry import TARGETS
    from retool.runtime import make_session, run_session

    threads = int(args["threads"])
    fp32 = args["onnx"]
    art = artifact_from_onnx(fp32)
    out_dir = Path(args["out_dir"])
    res: dict = {"status": "ok", "threads": threads, "fp32_size_bytes": model_size(fp32), "targets": {}}
    paths: dict[str, str] = {}
    for t in args["targets"]:
        dst = out_dir / f"{Path(fp32).stem}.{t}.onnx"
        t0 = time.perf_counter()
        try:
            got, report = _optimize(fp32, str(dst), t, threads)
        except Exception as exc:  # a RetoolError is a result too: the target refused this model
            res["targets"][t] = failed(exc)
            continue
        entry = {"status": "ok", "optimize_s": round(time.perf_counter() - t0, 3),
                 "precision": getattr(got, "precision", None), "size_bytes": model_size(got.path),
                 "size_vs_fp32": {"value": round(model_size(got.path) / res["fp32_size_bytes"], 4), "unit": "x",
                                  "better": "lower"}}
        entry["provider"] = TARGETS.get(t).provider
        entry["timed_on_target_hardware"] = on_target_hardware(t, entry["provider"])
        chosen = ((getattr(report, "data", None) or {}).get("auto") or {}).get("chosen")
        if chosen:
            entry["chosen"] = chosen
        res["targets"][t] = entry
        paths[t] = str(got.path)

    sessions = {"fp32": make_session(fp32, threads=threads)}
    for t, p in paths.items():
        try:
            sessions[t] = make_session(p, threads=threads)
        except Exception as exc:
            res["targets"][t].update(status="error", reason=f"ORT CPU session: {failed(exc)['reason']}")
    # Parity on held-out inputs: a seed no converter, calibrator or verifier uses.
    n, bs = int(args.get("parity_samples", 64)), 8
    batches = [feeds_for(art.inputs, min(bs, n - i), seed=777_000 + i) for i in range(0, n, bs)]
    ref = [run_session(sessions["fp32"], f) for f in batches]
    for t in list(sessions):
        if t == "fp32":
            continue
        try:
            res["targets"][t]["parity"] = _parity(ref, [run_session(sessions[t], f) for f in batches])
            res["targets"][t]["parity"]["samples"] = n
        except Exception as exc:
            res["targets"][t].update(status="error", reason=f"run on held-out inputs: {failed(exc)['reason']}")
            sessions.pop(t)
    for b in args["batches"]:
        feeds = feeds_for(art.inputs, b, seed=2000 + b)
        fns = {name: (lambda s=s: run_session(s, feeds)) for name, s in sessions.items()}
        s = interleaved(fns, warmup=args.get("warmup", 2), min_rounds=args.get("min_rounds", 5),
                        budget_s=args.get("budget_s", 3.0))
        res.setdefault("fp32_latency", {})[str(b)] = summarize(s["fp32"])
        for t in sessions:
            if t != "fp32":
                res["targets"][t].setdefault("latency", {})[str(b)] = summarize(s[t])
                res["targets"][t].setdefault("latency_vs_fp32", {})[str(b)] = ratio_summary(s[t], s["fp32"])
    return res


def optimize_one(args: dict) -> dict:
    """One optimisation in its own process, so the parent reads its peak RSS."""
    try:
        import retool.optimizers.core  # noqa: F401
    except ImportError as exc:
        return skipped(f"retool.optimizers.core not importable yet ({exc})")
    t0 = time.perf_counter()
    got, _ = _optimize(args["onnx"], args["out"], args["target"], args.get("threads"))
    return {"status": "ok", "optimize_s": round(time.perf_counter() - t0, 3), "size_bytes": model_size(got.path)}


def _pipeline_config(args: dict) -> dict:
    return {"version": 1, "models": [{
        "name": "bench", "source": args["source"], "targets": [args["target"]],
        "validation": {"batch_sizes": [1], "latency": True, "threads": int(args["threads"])}}]}


def pipeline_run(args: dict) -> dict:
    """``retool.run`` on one model and one target (fresh output folder: no cache hits, no publish)."""
    try:
        from retool.pipeline import run
    except ImportError as exc:
        return skipped(f"retool.pipeline (retool run) not importable yet ({exc})")
    out = Path(args["out"])
    t0 = time.perf_counter()
    result = run(_pipeline_config(args), out=out)
    wall = time.perf_counter() - t0
    if result.exit_code:
        return {"status": "error", "reason": f"retool run exited {result.exit_code}: "
                f"{[o.message for o in result.outcomes if o.message][:1]}"}
    # The stage times the jobs measured themselves (inside the worker): the rest is the pipeline's own cost
    # (worker spawn and imports, cache hashing, scheduling, summary files).
    steps = {"convert_s": next(iter(result.converts.values()), {}).get("seconds")}
    for stage, rec in (result.outcomes[0].stages or {}).items():
        steps[f"{stage}_s"] = rec.get("seconds")
    return {"status": "ok", "wall_s": wall, "steps": {k: v for k, v in steps.items() if isinstance(v, (int, float))}}


def pipeline_bare(args: dict) -> dict:
    """The library calls ``retool run`` makes for one model and target (retool/pipeline/jobs.py), bare."""
    try:
        from retool.converter.core import convert
        from retool.optimizers.core import optimize
        from retool.validators.core import validate, write_reports
    except ImportError as exc:
        return skipped(f"a stage is not importable yet ({exc})")
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    steps = {}
    t = time.perf_counter()
    convert(args["source"], out / "fp32.onnx")
    steps["convert_s"] = time.perf_counter() - t
    t = time.perf_counter()
    optimize(out / "fp32.onnx", out / "model.onnx", target=args["target"])
    steps["optimize_s"] = time.perf_counter() - t
    t = time.perf_counter()
    rep = validate(out / "model.onnx", out / "fp32.onnx", batch_sizes=(1,), latency=True,
                   threads=int(args["threads"]), framework="onnx")
    write_reports(rep, out / "report")
    steps["validate_s"] = time.perf_counter() - t
    return {"status": "ok", "wall_s": sum(steps.values()), "steps": steps}


TASKS = {f.__name__: f for f in (prepare_keras, prepare_caffe, source_latency, targets, optimize_one,
                                 pipeline_run, pipeline_bare)}


def main(argv: list[str]) -> int:
    task, args = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    try:
        result = TASKS[task](args)
    except Exception as exc:
        result = failed(exc)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
