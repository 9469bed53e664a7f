"""How sure an agreement share is: the lower confidence bound an accuracy goal is judged on.

An accuracy goal ("top1>=0.97") is a claim about inputs not yet seen, so it is judged on a
one-sided lower confidence bound of the agreement over the held-out rows, not on the share:
8/8 agreeing rows are what a model that agrees 87.5 % of the time shows about a third of the time.

The bound is **Clopper-Pearson** (exact binomial), one-sided at ``CONFIDENCE``. Why not
Wilson: Wilson's score interval has good *average* coverage, but its coverage dips below
the nominal level near p = 1 with small n, which is exactly where goals such as 0.97 live;
Clopper-Pearson never covers less than the nominal level, so a goal it passes holds with at
least that confidence. It is also the one with a closed form at k = n (``alpha ** (1/n)``),
which says how many rows a goal needs at the least. Pure Python (no scipy).
"""
from __future__ import annotations

import math

#: one-sided confidence of the lower bound
CONFIDENCE = 0.95
METHOD = "Clopper-Pearson"


def _binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (n up to the millions)."""
    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    lgn = math.lgamma(n + 1)
    terms = [lgn - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k, n + 1)]
    m = max(terms)
    return min(1.0, math.exp(m) * sum(math.exp(t - m) for t in terms))


def lower_bound(agree: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson lower bound of a binomial proportion: the p at which
    ``agree`` or more of ``n`` would happen with probability ``1 - confidence``."""
    if n <= 0:
        return 0.0
    if not 0 <= agree <= n:
        raise ValueError(f"agree {agree} outside 0..{n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence {confidence}: must be between 0 and 1")
    alpha = 1.0 - confidence
    if agree == 0:
        return 0.0
    if agree == n:
        return alpha ** (1.0 / n)
    lo, hi = 0.0, agree / n
    for _ in range(60):  # bisection: P(X >= agree | p) rises with p
        mid = (lo + hi) / 2
        if _binom_sf(agree, n, mid) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def rows_needed(goal: float, confidence: float = CONFIDENCE) -> int:
    """The fewest rows with which a goal can be shown at all (every row agreeing): n with
    ``(1 - confidence) ** (1/n) >= goal``. top1>=0.97 needs 99, top1>=0.9 needs 29."""
    if goal <= 0.0:
        return 1
    if goal >= 1.0:  # no finite sample bounds a share at exactly 1: such a goal is judged on every row agreeing
        return 1
    n = math.ceil(math.log(1.0 - confidence) / math.log(goal))
    while (1.0 - confidence) ** (1.0 / n) < goal:  # guard the float rounding at the boundary
        n += 1
    return max(1, n)


def describe(confidence: float = CONFIDENCE) -> str:
    return f"one-sided {confidence * 100:g}% {METHOD} lower bound"


def unseen_share_below(n: int, confidence: float = CONFIDENCE) -> float:
    """With all ``n`` rows meeting a limit, the share of unseen rows that may still miss it,
    at ``confidence``: ``1 - alpha ** (1/n)`` (about 3/n, the rule of three)."""
    return 1.0 - (1.0 - confidence) ** (1.0 / n) if n > 0 else 1.0
