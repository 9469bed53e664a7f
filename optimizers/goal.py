"""An accuracy goal as an input: ``top1>=0.97,cos>=0.999``, measured on held-out samples.

A goal replaces the target's limits: the metrics it names (top-1, cosine) are the
test, and the others (the target's cosine or top-1, atol/rtol) are off: it says how faithful the result must be, and
``optimize`` looks for the fastest artifact that is at least that faithful.

A goal is a statistical claim about inputs not yet seen, so it is judged on a bound
(validators.bounds): top-1 on the one-sided 95 % Clopper-Pearson lower bound of the
agreement over the held-out rows; cosine on the lowest per-row cosine (every held-out row
must meet it, besides the whole output). Before any work, a top-1 goal that the held-out
rows cannot show even at 100 % agreement is refused with the count it needs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from retool.errors import UsageError
from retool.validators import bounds

#: spellings accepted for each metric -> the Tolerance field it sets
_KEYS = {"top1": "min_top1", "top-1": "min_top1", "top_1": "min_top1", "min_top1": "min_top1",
         "cos": "min_cosine", "cosine": "min_cosine", "min_cosine": "min_cosine"}
#: Speed-up over fp32 below which a goal's search keeps no more nodes in float: a mix decidedly slower
#: than this (retool.speed's rule on the step's paired timings) has given up what int8 is for.
MIN_SPEEDUP = 1.5
_PART = re.compile(r"^\s*([a-z_\-0-9]+)\s*(>=|=>|>|=)\s*([0-9.eE+\-]+)\s*$")


@dataclass(frozen=True)
class AccuracyGoal:
    min_top1: float | None = None
    min_cosine: float | None = None
    confidence: float = bounds.CONFIDENCE

    def tolerance_overrides(self) -> dict:
        """The goal is the whole agreement test: a metric it does not name is not checked."""
        return {"atol": None, "rtol": None, "min_top1": self.min_top1, "min_cosine": self.min_cosine,
                "confidence": self.confidence}

    def rows_needed(self) -> int:
        """Held-out rows without which the top-1 goal cannot be shown even if every row agrees."""
        return bounds.rows_needed(self.min_top1, self.confidence) if self.min_top1 is not None else 0

    def judged_on(self) -> str:
        parts = []
        if self.min_top1 is not None:
            parts.append(f"top1 on the {bounds.describe(self.confidence)} of the agreement over the held-out rows"
                         + (" (a goal of 1: every row agrees)" if self.min_top1 >= 1.0 else ""))
        if self.min_cosine is not None:
            parts.append("cos on the lowest per-row cosine and on the whole output's")
        return "; ".join(parts)

    def __str__(self) -> str:
        parts = ([f"top1>={self.min_top1:g}"] if self.min_top1 is not None else []) + (
            [f"cos>={self.min_cosine:g}"] if self.min_cosine is not None else [])
        return ",".join(parts)

    def to_dict(self) -> dict:
        return {"min_top1": self.min_top1, "min_cosine": self.min_cosine, "text": str(self),
                "confidence": self.confidence, "judged_on": self.judged_on(),
                "rows_needed": self.rows_needed() or None}


def below_floor(attempt: dict, floor: float = MIN_SPEEDUP) -> str | None:
    """Why a timed search step ends the search (decidedly below ``floor`` x fp32), else None.
    Undecided or untimed steps go on: only a decided verdict stops the search."""
    from retool import speed

    d = ((attempt.get("latency") or {}).get("ratio_vs_fp32") or {}).get("decision")
    if not d or not isinstance(d.get("estimate"), (int, float)) or not d.get("interval"):
        return None
    dec = speed.decide(d["estimate"], d["interval"][0], d["interval"][1], floor)
    if dec.outcome != speed.FAIL:
        return None
    return f"speed-up {speed.format_decision(dec)} is decidedly below the goal's floor of {floor:g}x fp32"


def check_showable(goal: AccuracyGoal | None, reference, names, model, heldout_source: str) -> None:
    """Refuse, before any work, a top-1 goal the held-out rows cannot show even at 100 % agreement,
    or one no output can measure (no output looks like class scores)."""
    from retool.validators.parity import looks_like_scores

    if goal is None or goal.min_top1 is None:
        return
    scores = [(n, r) for n, r in zip(names, reference) if looks_like_scores(r)]
    if not scores:
        raise UsageError(f"{model}: --accuracy {goal}: no output looks like class scores (2-D, batch x classes), "
                         f"so top-1 cannot be measured; use a cos goal, e.g. 'cos>=0.999'")
    rows = min(int(r.shape[0]) for _, r in scores)
    need = goal.rows_needed()
    if rows >= need:
        return
    best = bounds.lower_bound(rows, rows, goal.confidence)
    how = ("--heldout {0} (random held-out data)" if heldout_source == "random" else
           "--heldout {0} with --calibration data holding more samples than that (or calibration.heldout in the "
           "pipeline YAML)").format(need)
    raise UsageError(f"{model}: accuracy goal {goal} cannot be shown with {rows} held-out rows: even {rows}/{rows} "
                     f"agreeing gives a {bounds.describe(goal.confidence)} of {best:.3f}; give at least {need} "
                     f"held-out samples: {how}")


def parse_goal(goal) -> AccuracyGoal | None:
    """``"top1>=0.97,cos>=0.999"``, a mapping ``{top1: 0.97, cos: 0.999}`` (YAML), or None."""
    if goal is None or goal == "":
        return None
    if isinstance(goal, AccuracyGoal):
        return goal
    pairs: list[tuple[str, str]] = []
    if isinstance(goal, Mapping):
        pairs = [(str(k), str(v)) for k, v in goal.items()]
    elif isinstance(goal, str):
        for part in goal.split(","):
            m = _PART.match(part.lower())
            if not m:
                raise UsageError(f"--accuracy {goal!r}: cannot read {part.strip()!r}; write e.g. "
                                 f"'top1>=0.97,cos>=0.999' (metrics: top1, cos)")
            pairs.append((m.group(1), m.group(3)))
    else:
        raise UsageError(f"accuracy goal: expected text like 'top1>=0.97,cos>=0.999' or a mapping, "
                         f"got {type(goal).__name__}")
    kw: dict = {}
    for key, val in pairs:
        field = _KEYS.get(key.strip().lower())
        if field is None:
            raise UsageError(f"--accuracy: unknown metric {key!r}; use top1 and/or cos, e.g. 'top1>=0.97,cos>=0.999'")
        try:
            v = float(val)
        except ValueError:
            raise UsageError(f"--accuracy: {val!r} is not a number (for {key})") from None
        if not 0.0 <= v <= 1.0 and field == "min_top1" or not -1.0 <= v <= 1.0:
            raise UsageError(f"--accuracy: {key}>={val} is outside the metric's range "
                             f"({'0..1' if field == 'min_top1' else '-1..1'})")
        kw[field] = v
    if not kw:
        raise UsageError("--accuracy: no metric given; write e.g. 'top1>=0.97,cos>=0.999'")
    return AccuracyGoal(**kw)
