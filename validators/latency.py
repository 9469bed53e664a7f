"""Latency: warm up, then time variants *interleaved* so machine noise hits them equally.

A variant is a zero-argument callable that runs one batch (an ORT session on
prepared feeds, a torch module ...). Each round runs every variant once, and
the order alternates between rounds (A B, B A, ...) so neither variant always
runs on a cache warmed, or a core heated, by the other.
"""
from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

#: Without --runs or a time budget, each batch size gets this many seconds (all variants together).
DEFAULT_TIME_BUDGET_S = 2.0
#: With --runs and no time budget, rounds continue until at least this many seconds have passed too:
#: 30 runs of a 0.07 ms model are 2 ms of data, and their p99 is the single slowest run.
MIN_TIME_S = 1.0
#: Rounds measured at least / at most when a time budget decides.
MIN_RUNS = 10
MAX_RUNS = 10_000
WARMUP_RUNS = 3
#: Per variant and batch, at most this many raw samples are kept in the report.
MAX_SAMPLES_KEPT = 500


@dataclass(frozen=True)
class Plan:
    """How long to measure: rounds until *both* a count and a duration are reached (with a cap).

    ``runs`` alone is exactly that many rounds (the plan ``make`` builds always has a duration).
    """

    runs: int | None = None
    time_budget_s: float | None = None
    warmup: int = WARMUP_RUNS
    min_runs: int = MIN_RUNS
    max_runs: int = MAX_RUNS

    @classmethod
    def make(cls, runs: int | None = None, time_budget_s: float | None = None, warmup: int | None = None) -> "Plan":
        """``runs``: at least this many rounds; ``time_budget_s``: at least this many seconds (0: count only)."""
        from retool.errors import UsageError

        if runs is not None and runs < 1:
            raise UsageError(f"--runs {runs}: must be at least 1")
        if time_budget_s is not None and time_budget_s < 0:
            raise UsageError(f"--time-budget {time_budget_s}: must be 0 seconds or more")
        if time_budget_s is None:
            time_budget_s = DEFAULT_TIME_BUDGET_S if runs is None else MIN_TIME_S
        warm = WARMUP_RUNS if warmup is None else max(0, int(warmup))
        if time_budget_s == 0:
            return cls(runs or MIN_RUNS, None, warm)
        floor = MIN_RUNS if runs is None else runs
        return cls(None, float(time_budget_s), warm, floor, max(MAX_RUNS, floor))

    def to_dict(self) -> dict:
        return {"runs": self.runs, "time_budget_s": self.time_budget_s, "warmup": self.warmup,
                "min_runs": self.min_runs if self.runs is None else None,
                "max_runs": self.max_runs if self.runs is None else None}


def default_threads() -> int:
    """The CPUs this process may use (affinity-aware), so the number stated is the number used."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def measure_interleaved(variants: Mapping[str, Callable[[], object]], plan: Plan, *, cpu_times: bool = False):
    """Milliseconds per run for each variant, measured in alternating rounds.

    ``cpu_times``: also the calling thread's CPU time per run (``time.thread_time_ns``), returned as
    ``(wall, cpu)``. At 1 intra-op thread ORT runs on the calling thread, so that figure barely moves
    when other processes take the CPU (being descheduled costs wall time, not thread CPU time).
    """
    names = list(variants)
    for _ in range(plan.warmup):
        for n in names:
            variants[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] | None = {n: [] for n in names} if cpu_times else None
    clock = time.perf_counter_ns
    start = time.perf_counter()
    gc_was_on = gc.isenabled()
    gc.disable()  # like timeit: a collection in one variant's run would be charged to it
    from retool import machine

    try:
        with machine.watch("timing"):
            _rounds(variants, names, plan, samples, clock, start, cpu)
    finally:
        if gc_was_on:
            gc.enable()
    return (samples, cpu) if cpu_times else samples


def _rounds(variants, names, plan, samples, clock, start, cpu=None) -> None:
    tclock = time.thread_time_ns
    rounds = 0
    while True:
        if plan.runs is not None:
            if rounds >= plan.runs:
                break
        elif rounds >= plan.max_runs or (rounds >= plan.min_runs and time.perf_counter() - start >= plan.time_budget_s):
            break
        order = names if rounds % 2 == 0 else names[::-1]
        for n in order:
            fn = variants[n]
            if cpu is None:
                t0 = clock()
                fn()
                samples[n].append((clock() - t0) / 1e6)
            else:
                c0, t0 = tclock(), clock()
                fn()
                t1, c1 = clock(), tclock()
                samples[n].append((t1 - t0) / 1e6)
                cpu[n].append((c1 - c0) / 1e6)
        rounds += 1


def summarize(samples_ms, batch: int, keep: int = MAX_SAMPLES_KEPT, cpu_ms=None) -> dict:
    """p50/p90/p99/mean/std in ms and items per second (from the median, which one slow run
    cannot move); ``samples_ms`` evenly thinned to ``keep``. ``cpu_ms`` (the calling thread's CPU
    time per run) adds ``cpu_p50_ms``: at 1 intra-op thread, a figure a busy machine barely moves."""
    a = np.asarray(samples_ms, dtype=np.float64)
    mean = float(a.mean())
    p50 = float(np.percentile(a, 50))
    kept = a if a.size <= keep else a[np.linspace(0, a.size - 1, keep).round().astype(int)]
    return {
        "p50_ms": p50, "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)), "mean_ms": mean, "std_ms": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min_ms": float(a.min()), "max_ms": float(a.max()),
        "throughput_per_s": float(batch * 1000.0 / p50) if p50 > 0 else math.inf,
        "runs": int(a.size), "batch": int(batch),
        "samples_ms": [round(float(x), 4) for x in kept],
        **({"cpu_p50_ms": float(np.percentile(np.asarray(cpu_ms, dtype=np.float64), 50))} if cpu_ms else {}),
    }


def paired_speedup(reference_ms, candidate_ms) -> dict:
    """The speed-up with its spread (IQR of the per-round ratios) and verdict: see retool.speed."""
    from retool.speed import paired

    return paired(reference_ms, candidate_ms)


def speedup(reference: Mapping, candidate: Mapping) -> float:
    """reference p50 / candidate p50: above 1 means the candidate is faster."""
    return float(reference["p50_ms"] / candidate["p50_ms"]) if candidate["p50_ms"] > 0 else math.inf
