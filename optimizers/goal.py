"""An accuracy goal as an input: ``top1>=0.97,cos>=0.999``, measured on held-out samples.

A goal replaces the target's limits: the metrics it names (top-1, cosine) are the
test, and the others (the target's cosine or top-1, atol/rtol) are off: it says how faithful the result must be, and
``optimize`` looks for the fastest artifact that is at least that faithful.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from retool.errors import UsageError

#: spellings accepted for each metric -> the Tolerance field it sets
_KEYS = {"top1": "min_top1", "top-1": "min_top1", "top_1": "min_top1", "min_top1": "min_top1",
         "cos": "min_cosine", "cosine": "min_cosine", "min_cosine": "min_cosine"}
_PART = re.compile(r"^\s*([a-z_\-0-9]+)\s*(>=|=>|>|=)\s*([0-9.eE+\-]+)\s*$")


@dataclass(frozen=True)
class AccuracyGoal:
    min_top1: float | None = None
    min_cosine: float | None = None

    def tolerance_overrides(self) -> dict:
        """The goal is the whole agreement test: a metric it does not name is not checked."""
        return {"atol": None, "rtol": None, "min_top1": self.min_top1, "min_cosine": self.min_cosine}

    def __str__(self) -> str:
        parts = ([f"top1>={self.min_top1:g}"] if self.min_top1 is not None else []) + (
            [f"cos>={self.min_cosine:g}"] if self.min_cosine is not None else [])
        return ",".join(parts)

    def to_dict(self) -> dict:
        return {"min_top1": self.min_top1, "min_cosine": self.min_cosine, "text": str(self)}


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
