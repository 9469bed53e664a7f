"""Latency of model variants at batch 1: fixed threads, spinning off, warmed up, interleaved, medians.

The timing loop is the validators' (alternating order, GC off); this module only opens the
ONNX sessions and reduces the samples to the figures an optimisation report carries.
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def measure(models: Mapping[str, object], feeds: Mapping[str, np.ndarray], threads: int | None = None,
            warmup: int = 5, min_rounds: int = 10, max_rounds: int = 5000, budget_s: float = 2.0) -> dict:
    """Median latency (ms) of each model on ``feeds``; one run of each per round so drift hits all alike."""
    from retool.runtime import make_session, run_session
    from retool.validators.latency import Plan, measure_interleaved

    threads = threads or default_threads()
    sessions = {k: make_session(p, threads=threads) for k, p in models.items()}
    plan = Plan(runs=None, time_budget_s=budget_s, warmup=warmup, min_runs=min_rounds, max_runs=max_rounds)
    times = measure_interleaved({k: (lambda s=s: run_session(s, feeds)) for k, s in sessions.items()}, plan)
    out = {"threads": threads, "batch": 1, "rounds": len(next(iter(times.values()))), "spinning": False,
           "variants": {}}
    for k, ts in times.items():
        a = np.asarray(ts)
        out["variants"][k] = {"p50_ms": round(float(np.median(a)), 4), "p90_ms": round(float(np.percentile(a, 90)), 4),
                              "min_ms": round(float(a.min()), 4)}
        if "fp32" in times and k != "fp32":  # paired per-round ratios: their spread says what is noise
            r = a / np.asarray(times["fp32"])
            out["variants"][k]["ratio_vs_fp32"] = {q: round(float(np.percentile(r, p)), 4)
                                                   for q, p in (("p25", 25), ("p50", 50), ("p75", 75))}
    if "fp32" in times:  # each variant's speed-up over fp32, with the spread of the paired rounds
        from retool.speed import paired

        out["speedup_vs_fp32"] = {k: paired(times["fp32"], ts) for k, ts in times.items() if k != "fp32"}
    return out


def slower_than_fp32(variant: dict) -> bool:
    """Slower beyond the noise: even the lower quartile of the paired ratios is above 1."""
    r = variant.get("ratio_vs_fp32")
    return bool(r) and r["p25"] > 1.0


#: ONNX metadata key the serving configuration reads (Triton's intra_op_thread_count).
THREADS_KEY = "retool.intra_op_threads"


def all_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def thread_sweep(fp32_path, cand_path, feeds, budget_s: float = 1.0) -> dict:
    """The candidate (and fp32) at 1 and at all threads; the fastest intra-op thread count for the candidate.

    At small sizes more threads can be slower (a 4-layer BERT ran slower in int8 at 2 threads than at 1):
    the best count is a property of the artifact, so it is measured and handed to serving."""
    counts = sorted({1, all_threads()})
    out: dict = {"measured": {}, "key": THREADS_KEY}
    for t in counts:
        m = measure({"fp32": fp32_path, "candidate": cand_path}, feeds, threads=t, budget_s=budget_s)
        c = m["variants"]["candidate"]
        out["measured"][str(t)] = {"candidate_p50_ms": c["p50_ms"], "fp32_p50_ms": m["variants"]["fp32"]["p50_ms"],
                                   "ratio_vs_fp32": c.get("ratio_vs_fp32"), "rounds": m["rounds"]}
    best = min(counts, key=lambda t: out["measured"][str(t)]["candidate_p50_ms"])
    out["best_intra_op_threads"] = best
    return out


def step_latency(ctx, path) -> dict:
    """One accuracy-search step against fp32 at batch 1 (a short budget: it is per step)."""
    m = measure({"fp32": ctx.src, "candidate": path}, ctx.heldout[0], threads=ctx.threads, budget_s=1.0)
    c, f = m["variants"]["candidate"], m["variants"]["fp32"]
    return {"p50_ms": c["p50_ms"], "fp32_p50_ms": f["p50_ms"], "ratio_vs_fp32": c.get("ratio_vs_fp32"),
            "threads": m["threads"], "batch": 1}
