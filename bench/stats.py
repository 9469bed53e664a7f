"""Statistics and timing loops for the benchmarks. Standard library + numpy only.

A *metric* in a result file is a dict with ``median`` (or ``value``), a spread,
``unit`` and ``better`` ("lower" | "higher"); ``bench/compare.py`` compares
every such dict it finds at the same path in two result files.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Sequence


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method) of a non-empty sequence."""
    s = sorted(xs)
    if not s:
        raise ValueError("quantile of an empty sequence")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(xs: Sequence[float], unit: str = "s", better: str = "lower", digits: int = 6) -> dict:
    """Median and spread (IQR, min, max) of repeated samples, as a metric dict."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', not {better!r}")
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("no samples")
    p25, p75 = quantile(xs, 0.25), quantile(xs, 0.75)
    r = lambda v: round(v, digits)  # noqa: E731
    return {"median": r(statistics.median(xs)), "p25": r(p25), "p75": r(p75), "iqr": r(p75 - p25),
            "min": r(min(xs)), "max": r(max(xs)), "n": len(xs), "unit": unit, "better": better}


def value(v: float, unit: str = "", better: str = "lower", digits: int = 6) -> dict:
    """A single measured figure (no repeats), as a metric dict."""
    return {"value": round(float(v), digits), "unit": unit, "better": better}


def ratio_summary(num: Sequence[float], den: Sequence[float], better: str = "lower") -> dict:
    """Median and spread of the per-round ratios ``num[i] / den[i]`` of paired samples.

    Pairing cancels noise both variants saw in the same round; ``ratio_of_medians``
    is kept for readers who want ``median(num) / median(den)``.
    """
    if len(num) != len(den) or not num:
        raise ValueError("ratio needs two paired, non-empty sample lists")
    m = summarize([a / b for a, b in zip(num, den)], unit="x", better=better)
    m["ratio_of_medians"] = round(statistics.median(num) / statistics.median(den), 6)
    return m


def interleaved(fns: Mapping[str, Callable[[], object]], *, warmup: int = 2, min_rounds: int = 5,
                max_rounds: int = 200, budget_s: float = 5.0, clock=time.perf_counter) -> dict[str, list[float]]:
    """Time every function once per round, rotating the order each round, until the budget is spent.

    Interleaving puts the variants under the same machine noise (other processes,
    frequency changes); rotating the order cancels any first-in-round effect.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = clock()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or clock() - start < budget_s):
        k = rounds % len(names)
        for n in names[k:] + names[:k]:
            t0 = clock()
            fns[n]()
            samples[n].append(clock() - t0)
        rounds += 1
    return samples


def repeat(fn: Callable[[], float | None], n: int, clock=time.perf_counter) -> list[float]:
    """Wall time of ``n`` calls, or the value ``fn`` returns when it measures itself."""
    out = []
    for _ in range(n):
        t0 = clock()
        got = fn()
        out.append(float(got) if isinstance(got, (int, float)) else clock() - t0)
    return out


def is_metric(d) -> bool:
    return isinstance(d, dict) and "better" in d and ("median" in d or "value" in d)


def central(d: dict) -> float:
    return float(d["median"] if "median" in d else d["value"])


def fmt_metric(d, fmt="{:.3f}", scale=1.0, spread=True) -> str:
    """``median [p25-p75]`` of a metric dict, or its value; '-' when absent."""
    if not isinstance(d, dict):
        return "-"
    if "median" in d:
        s = fmt.format(d["median"] * scale)
        return f"{s} [{fmt.format(d['p25'] * scale)}-{fmt.format(d['p75'] * scale)}]" if spread and d.get("n", 0) > 1 else s
    if "value" in d:
        return fmt.format(d["value"] * scale)
    return "-"
