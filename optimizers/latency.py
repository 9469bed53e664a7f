"""Latency of model variants at batch 1: fixed threads, spinning off, warmed up, interleaved, medians."""
from __future__ import annotations

import os
import time
from typing import Mapping

import numpy as np


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def measure(models: Mapping[str, object], feeds: Mapping[str, np.ndarray], threads: int | None = None,
            warmup: int = 5, min_rounds: int = 10, max_rounds: int = 5000, budget_s: float = 2.0) -> dict:
    """Median latency (ms) of each model on ``feeds``; one run of each per round so drift hits all alike."""
    from retool.runtime import make_session, run_session

    threads = threads or default_threads()
    sessions = {k: make_session(p, threads=threads) for k, p in models.items()}
    for sess in sessions.values():
        for _ in range(warmup):
            run_session(sess, feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        for k, sess in sessions.items():
            t0 = time.perf_counter()
            run_session(sess, feeds)
            times[k].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    out = {"threads": threads, "batch": 1, "rounds": rounds, "spinning": False, "variants": {}}
    for k, ts in times.items():
        a = np.asarray(ts)
        out["variants"][k] = {"p50_ms": round(float(np.median(a)), 4), "p90_ms": round(float(np.percentile(a, 90)), 4),
                              "min_ms": round(float(a.min()), 4)}
    return out
