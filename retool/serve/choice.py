"""Judging load points and choosing among serving configurations (loadtest.py owns the sweep itself).

Every judgement here goes through the one decision rule (retool.speed.decide) on an interval:

- **one point against a p99 budget**: perf_analyzer reports a point once its three windows agree within
  its stability bound (``STABILITY_PCT``, or ``LOOSE_STABILITY_PCT`` for a point marked unstable), so
  the point's p99 is taken to be known within that bound. It meets the budget (pass) only when the whole
  band is under it; when the band straddles the budget the point is measured again (``REMEASURE`` more
  runs) and the runs' p99s are judged by a bootstrap interval of their median (speed.decide_sample).
  Still undecided, the point does **not** meet the budget: the safe default, as for ``--max-p99-ms``
  (a lower rate or a smaller load is planned, never a p99 that may miss).
- **one point against another** (a challenger against the published configuration, two candidates):
  each figure within its stability bound, the ratio's bounds from theirs.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from retool.serve.loadtest import LOOSE_STABILITY_PCT, STABILITY_PCT, LoadPoint

#: requests a rate point's window should hold, so its count and its p99 mean something
MIN_REQUESTS_PER_WINDOW = 50
#: runs added at a point whose p99 is within the noise of the budget (3 in all: an interval of their median)
REMEASURE = 2


def band(value: float, stable: bool = True) -> tuple[float, float]:
    """What one perf_analyzer figure is known to within: its windows agreed within the stability bound."""
    s = (STABILITY_PCT if stable else LOOSE_STABILITY_PCT) / 100
    return value / (1 + s), value * (1 + s)


def compare(a: LoadPoint, b: LoadPoint, by: str):
    """The decision rule on ``a`` against ``b``: pass when a is better beyond the noise, by "throughput"
    (higher is better) or "p99_ms" (lower is better)."""
    from retool.speed import decide

    (alo, ahi), (blo, bhi) = band(getattr(a, by), a.stable), band(getattr(b, by), b.stable)
    if by == "throughput":
        return decide(a.throughput / b.throughput, alo / bhi, ahi / blo, 1.0, higher_is_better=True,
                      rule="throughput ratio, each within the stability bound of its windows", samples=2, confidence=0.0)
    return decide(b.p99_ms / a.p99_ms, blo / ahi, bhi / alo, 1.0, higher_is_better=True,
                  rule="p99 ratio (other/this), each within the stability bound of its windows", samples=2, confidence=0.0)


def rate_window_ms(rate: float, window_ms: int) -> int:
    """The window for a point at ``rate``: long enough for MIN_REQUESTS_PER_WINDOW requests (at most 10 s)."""
    return int(max(window_ms, min(10_000, 1000 * MIN_REQUESTS_PER_WINDOW / max(rate, 1e-9))))


def keeps_up(p: LoadPoint, rate: float, window_ms: int) -> bool:
    """The server completed what was offered: Poisson arrivals over the ~3 windows perf_analyzer averages
    vary by sqrt(n), so a shortfall within 3 standard deviations (and at most 5 %) is not a fall-behind."""
    n = max(rate * 3 * window_ms / 1000, 1.0)
    return p.throughput >= rate * (1 - max(0.05, 3 / math.sqrt(n)))


def meets(points: Sequence[LoadPoint], budget_ms: float):
    """Do these runs of one load point meet ``p99 <= budget_ms``? One run: its stability band; several:
    a bootstrap interval of their median p99."""
    from retool.speed import decide, decide_sample

    if len(points) == 1:
        p = points[0]
        lo, hi = band(p.p99_ms, p.stable)
        return decide(p.p99_ms, lo, hi, budget_ms, higher_is_better=False, samples=1, confidence=0.0, unit="ms",
                      rule="p99 within the stability bound of perf_analyzer's windows")
    return decide_sample([p.p99_ms for p in points], budget_ms, higher_is_better=False)


def judge(first: LoadPoint, budget_ms: float, again: Callable[[], LoadPoint] | None = None,
          tries: int = REMEASURE):
    """``first`` against the budget, measured again (``again``) while undecided. Returns the decision, the
    run that stands for them all (the median p99's) and the runs added. Only ``passed`` meets the budget:
    callers plan an undecided point as if it missed."""
    runs = [first]
    d = meets(runs, budget_ms)
    while d.undecided and again is not None and len(runs) <= tries:
        runs.append(again())
        if len(runs) > tries:
            d = meets(runs, budget_ms)
    if d.undecided:
        d = d.with_outcome("undecided", f"p99 within the noise of the budget after {len(runs)} run(s): planned as "
                                        "a miss (the safe side)")
    return d, sorted(runs, key=lambda p: p.p99_ms)[len(runs) // 2], runs[1:]


def over_budget(p: LoadPoint, budget_ms: float | None) -> bool:
    """A sweep can stop here: this point is over the budget beyond the noise (more load only queues more)."""
    return budget_ms is not None and meets([p], budget_ms).outcome == "fail"


def configuration(measured: Sequence, published, by: str, confirm: Callable | None = None):
    """Which configuration to serve: the best kept point (lowest p99 at a fixed rate, ``by="p99_ms"``; else
    the highest throughput), but the published configuration stays unless that best beats it beyond the
    noise. ``measured``: tune.Measured items; ``published``: the one among them that is published (or None).
    The two were measured one after the other, so a load that changed in between can fake a win:
    ``confirm(challenger, published)`` re-measures them in alternation and its paired decision is the
    one that counts (see ``confirmed``).
    Returns (chosen, the decision against the published configuration, the challenger it was taken on)."""
    kept = [m for m in measured if m.best is not None]
    if not kept:
        return None, None, None
    best = (min(kept, key=lambda m: m.best.p99_ms) if by == "p99_ms"
            else max(kept, key=lambda m: m.best.throughput))
    if published is None or published.best is None or best is published:
        return best, None, None
    d = compare(best.best, published.best, by)
    if d.passed and confirm is not None:
        d = confirm(best, published)
    return (best if d.passed else published), d, best


#: rounds of (published, challenger) measured in alternation before a challenger replaces the published
CONFIRM_ROUNDS = 3


def confirmed(published_runs: Sequence[LoadPoint], challenger_runs: Sequence[LoadPoint], by: str):
    """Paired rounds of the two configurations (round i of each measured back to back): pass when the
    challenger is better in the bootstrap interval of the median ratio, as speed gates are judged."""
    from retool.speed import decide, paired_ratio_interval

    if by == "throughput":  # the ratio of 1/throughput: higher is better for the challenger, as for p99
        ref, cand = [1 / max(p.throughput, 1e-12) for p in published_runs], [1 / max(p.throughput, 1e-12)
                                                                             for p in challenger_runs]
    else:
        ref, cand = [p.p99_ms for p in published_runs], [p.p99_ms for p in challenger_runs]
    est, lo, hi = paired_ratio_interval(ref, cand)
    return decide(est, lo, hi, 1.0, higher_is_better=True, samples=len(ref),
                  rule=f"{'throughput' if by == 'throughput' else 'p99'} ratio over {len(ref)} paired rounds "
                       f"(published, challenger) measured in alternation; bootstrap interval of the median")
