"""Latency gates judged by the one decision rule (retool.speed): pass, fail or undecided.

Each latency gate at each batch size is a :class:`retool.speed.Decision`:

* ``speedup@batchN`` (``min_speedup``): the paired bootstrap CI of reference p50 /
  candidate p50 against the minimum;
* ``not-slower@batchN`` (quantized candidates): the same CI against
  ``1 / (1 + NOISE_FLOOR)`` (slower by more than 2 % fails);
* ``latency:p99@batchN`` (``max_p99_ms``): the bootstrap CI of the candidate's p99.

While a gate is undecided, :func:`measure_until_decided` times more interleaved
rounds, up to ``decide_budget_s`` seconds per batch size. Still undecided, the gate
takes its default (``undecided``): **fail** for ``min_speedup`` and ``max_p99_ms``
(the user asked for a guarantee, and an interval that straddles it does not give
one), **pass** for not-slower (a guard against a clear regression: a tie within the
noise is not one, and failing it would block every quantized model on a busy runner).
"""
from __future__ import annotations

import time
from typing import Callable, Mapping

from retool import speed

#: gate kind -> outcome when still undecided after the budget
DEFAULT_UNDECIDED = {"min_speedup": speed.FAIL, "max_p99_ms": speed.FAIL, "not_slower": speed.PASS}
#: extra timing per batch size while a gate is undecided (seconds)
DECIDE_BUDGET_S = 5.0
#: a candidate is "slower" when its whole speed-up interval is below this
NOT_SLOWER_THRESHOLD = 1.0 / (1.0 + speed.NOISE_FLOOR)
#: each extra measurement lasts at least this long (then the gates are judged again)
CHUNK_S = 0.5


def undecided_default(gates, kind: str) -> str:
    u = getattr(gates, "undecided", None) or {}
    return u.get(kind, DEFAULT_UNDECIDED[kind]) if isinstance(u, Mapping) else str(u)


def budget_s(gates, plan=None) -> float:
    """Extra seconds per batch size: the gates' ``decide_budget_s``, else the default (none when
    the plan asks for an exact number of runs)."""
    b = getattr(gates, "decide_budget_s", None)
    if b is not None:
        return float(b)
    if plan is not None and getattr(plan, "time_budget_s", 1) is None:
        return 0.0
    return DECIDE_BUDGET_S


def _limit(budget, batch: int):
    return budget.get(batch) if isinstance(budget, Mapping) else budget


def decisions_at(batch: int, samples: Mapping[str, list], gates, not_slower: bool,
                 cpu: Mapping[str, list] | None = None) -> dict[str, speed.Decision]:
    """Gate name -> Decision, for the latency gates that apply at ``batch`` (``samples``: ms per run,
    "candidate" and, paired round by round, "reference"). ``cpu``: thread CPU time per run, which
    the speed-up gates use instead of wall time (at 1 intra-op thread: see validators/latency.py);
    a p99 budget is about the wall time a caller waits, so it always uses wall time."""
    from dataclasses import replace

    out: dict[str, speed.Decision] = {}
    cand, ref = samples.get("candidate"), samples.get("reference")
    rcand, rref = (cpu.get("candidate"), cpu.get("reference")) if cpu else (cand, ref)
    on_cpu = " on the calling thread's CPU time (1 intra-op thread)" if cpu else ""
    if not cand:
        return out
    p99 = _limit(gates.max_p99_ms, batch)
    if p99 is not None:
        out[f"latency:p99@batch{batch}"] = speed.decide_sample(cand, p99, stat="p99", higher_is_better=False)
    if ref:
        ms = _limit(gates.min_speedup, batch)
        if ms is not None:
            d = speed.decide_ratio(rref, rcand, ms)
            out[f"speedup@batch{batch}"] = replace(d, rule=d.rule + on_cpu)
        if not_slower:
            d = speed.decide_ratio(rref, rcand, NOT_SLOWER_THRESHOLD)
            out[f"not-slower@batch{batch}"] = replace(d, rule=d.rule + on_cpu)
    return out


def measure_until_decided(batch: int, samples: dict[str, list], variants: Mapping[str, Callable], gates,
                          not_slower: bool, budget: float, *, cpu: dict[str, list] | None = None,
                          use_cpu: bool = False, clock: Callable[[], float] = time.monotonic):
    """Judge the gates at ``batch``; while any is undecided, time more rounds (up to ``budget`` s).

    Returns (decisions, extra seconds). ``samples`` (and ``cpu``) grow in place; ``use_cpu``: the
    speed-up gates judge ``cpu`` (thread CPU time) instead of wall time.
    """
    judged = cpu if use_cpu else None
    from dataclasses import replace

    from retool.validators.latency import MAX_RUNS, MIN_RUNS, Plan, measure_interleaved

    ds = decisions_at(batch, samples, gates, not_slower, judged)
    t0 = clock()
    tries = 0
    while any(d.undecided for d in ds.values()) and clock() - t0 < budget:
        chunk = max(CHUNK_S, min(budget - (clock() - t0), budget / 4))
        more, more_cpu = measure_interleaved(variants, Plan(runs=None, time_budget_s=chunk, warmup=0,
                                                            min_runs=MIN_RUNS, max_runs=MAX_RUNS), cpu_times=True)
        for k, v in more.items():
            samples[k].extend(v)
            if cpu is not None:
                cpu[k].extend(more_cpu[k])
        tries += 1
        ds = decisions_at(batch, samples, gates, not_slower, judged)
    extra = round(clock() - t0, 3) if tries else 0.0
    out = {}
    for name, d in ds.items():
        note = ""
        if d.undecided:
            note = (f"still undecided after {extra:.1f} s more timing (decide budget {budget:g} s)" if tries
                    else "undecided; no time budget to measure more")
        out[name] = replace(d, extra_s=extra, note=note)
    return out, extra


def kind_of(name: str) -> str:
    return ("max_p99_ms" if name.startswith("latency:") else "min_speedup" if name.startswith("speedup@")
            else "not_slower")


def resolved(name: str, d: speed.Decision, gates) -> speed.Decision:
    """``d`` with an undecided outcome replaced by the gate's default, saying so."""
    kind = kind_of(name)
    default = undecided_default(gates, kind)
    flag = {"min_speedup": "--min-speedup", "max_p99_ms": "--max-p99-ms", "not_slower": "not-slower"}[kind]
    return speed.resolve(d, default, f"undecided: the interval straddles the threshold; {flag} counts it as "
                                     f"{default} (--undecided {'pass' if default == 'fail' else 'fail'} to change)")


def from_stored(d: Mapping) -> speed.Decision:
    """A Decision back from its to_dict()."""
    lo, hi = (float(x) if x is not None else float("nan") for x in d["interval"])
    return speed.Decision(d["outcome"], float(d["estimate"]), (lo, hi), float(d["threshold"]),
                          bool(d["higher_is_better"]), float(d["confidence"]), d.get("rule", ""),
                          int(d.get("samples", 0)), d.get("unit", "×"), float(d.get("extra_s", 0.0)),
                          d.get("note", ""))
