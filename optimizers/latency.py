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
