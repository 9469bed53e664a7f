"""The one speed-up quantity, its spread, and the one way it is printed.

``speedup = reference p50 / candidate p50``: above 1 the candidate is faster.
Its spread is the inter-quartile range of the *paired* per-round ratios
``reference[i] / candidate[i]`` (both variants ran in the same round, so noise
that hit the round hits both). A speed-up whose IQR contains 1, or that is
within ``NOISE_FLOOR`` of 1, is "no measurable difference".

Every command, report and summary prints speed-ups with :func:`format_speedup`,
so the wording can change here and nowhere else. numpy only (no frameworks).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

#: Differences smaller than this (2 %) are never called measurable, however steady the timings.
NOISE_FLOOR = 0.02

FASTER, SLOWER, NONE = "faster", "slower", "none"


def verdict(value: float | None, iqr: Sequence[float] | None = None) -> str | None:
    """"faster", "slower" or "none" (inside the noise); None when there is no value."""
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    if abs(value - 1.0) < NOISE_FLOOR:
        return NONE
    if iqr is not None and len(iqr) == 2 and iqr[0] is not None and iqr[1] is not None:
        lo, hi = float(iqr[0]), float(iqr[1])
        if lo <= 1.0 <= hi:
            return NONE
        return FASTER if lo > 1.0 else SLOWER
    return FASTER if value > 1.0 else SLOWER


def paired(reference_ms: Sequence[float], candidate_ms: Sequence[float]) -> dict:
    """Speed-up of the candidate over the reference from paired per-round samples (ms).

    Returns ``{"speedup", "iqr": [p25, p75], "rounds", "verdict", "text"}``; ``speedup``
    is the ratio of the medians (the convention), the IQR that of the per-round ratios.
    """
    import numpy as np

    r = np.asarray(reference_ms, dtype=np.float64)
    c = np.asarray(candidate_ms, dtype=np.float64)
    n = min(r.size, c.size)
    if n == 0:
        raise ValueError("a speed-up needs samples of both variants")
    r, c = r[:n], c[:n]
    cmed = float(np.median(c))
    value = float(np.median(r)) / cmed if cmed > 0 else math.inf
    ok = c > 0
    ratios = r[ok] / c[ok]
    iqr = [round(float(np.percentile(ratios, 25)), 4), round(float(np.percentile(ratios, 75)), 4)] if ratios.size else None
    return stats(value, iqr, n)


def stats(value: float, iqr: Sequence[float] | None, rounds: int | None = None) -> dict:
    v = verdict(value, iqr)
    out = {"speedup": round(float(value), 4) if math.isfinite(value) else value,
           "iqr": list(iqr) if iqr is not None else None, "rounds": rounds, "verdict": v}
    out["text"] = format_speedup(value, iqr, v)
    return out


def format_speedup(value: float | None, iqr: Sequence[float] | None = None, verdict_: str | None = None,
                   *, spread: bool = True) -> str:
    """"1.32× faster (IQR 1.28–1.36)", "0.75× (slower; IQR 0.72–0.78)", "no measurable difference (1.01×, ...)".

    ``verdict_`` defaults to :func:`verdict` of ``value`` and ``iqr``; ``spread=False`` leaves the IQR out.
    """
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return "n/a (candidate time 0)"
    v = verdict_ or verdict(value, iqr)
    sp = f"IQR {iqr[0]:.2f}–{iqr[1]:.2f}" if (spread and iqr and None not in iqr) else ""
    if v == NONE:
        return f"no measurable difference ({value:.2f}×" + (f", {sp})" if sp else ")")
    if v == SLOWER:
        return f"{value:.2f}× (slower" + (f"; {sp})" if sp else ")")
    return f"{value:.2f}× faster" + (f" ({sp})" if sp else "")


def format_entry(entry: Mapping | float | None, *, spread: bool = True) -> str:
    """:func:`format_speedup` of a stored entry: a :func:`paired` dict, or a bare number (no spread known)."""
    if isinstance(entry, Mapping):
        return format_speedup(entry.get("speedup"), entry.get("iqr"), entry.get("verdict"), spread=spread)
    return format_speedup(entry, None, spread=spread)


def worst(entries: Mapping[str, Mapping | float]) -> tuple[str, Mapping | float] | None:
    """The (batch, entry) with the lowest speed-up, or None."""
    def val(e):
        x = e.get("speedup") if isinstance(e, Mapping) else e
        return math.inf if x is None else float(x)

    items = [(k, e) for k, e in entries.items() if e is not None]
    return min(items, key=lambda t: val(t[1])) if items else None
