"""Read a serving plan (``retool plan``'s JSON) and check it has what deploying needs.

The plan is a contract between two commands: unknown extra keys are fine (newer planners may add
some), a missing or ill-typed required key is a usage error naming the file and the key.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retool.errors import UsageError

KIND = "retool-serving-plan"
VERSIONS = (1,)

#: dotted key -> expected type: "str", "int" (>= 1), "num" (> 0, finite), "num0" (>= 0), "bool", "obj"
REQUIRED = {
    "repository": "str",
    "family": "str",
    "inputs.rate": "num",
    "inputs.headroom": "num",
    "inputs.budget_p99_ms": "num",
    "chosen.model": "str",
    "chosen.version": "int",
    "chosen.config.instance_count": "int",
    "chosen.config.intra_op_thread_count": "int?",  # null: ORT's default, one thread per core
    "chosen.config.dynamic_batching": "bool",
    "chosen.max_batch_size": "int0",
    "chosen.sustainable_rate.value": "num",
    "chosen.replicas": "int",
    "chosen.resources.cpu": "num",
    "chosen.resources.memory_bytes": "int",
}


def _get(doc: Any, dotted: str) -> Any:
    cur = doc
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def _type_ok(v: Any, kind: str) -> bool:
    if kind.endswith("?"):
        return v is None or _type_ok(v, kind[:-1])
    if kind == "str":
        return isinstance(v, str) and bool(v.strip())
    if kind == "bool":
        return isinstance(v, bool)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    if kind == "int":
        return float(v).is_integer() and v >= 1
    if kind == "int0":
        return float(v).is_integer() and v >= 0
    return v > 0  # "num"


_WHAT = {"int?": "null or a whole number >= 1", "str": "a non-empty string", "bool": "true or false", "int": "a whole number >= 1",
         "int0": "a whole number >= 0", "num": "a finite number > 0"}


@dataclass(frozen=True)
class Plan:
    path: Path
    doc: dict

    def get(self, dotted: str, default=None):
        try:
            return _get(self.doc, dotted)
        except KeyError:
            return default

    @property
    def repository(self) -> str:
        return self.doc["repository"]

    @property
    def chosen(self) -> dict:
        return self.doc["chosen"]

    @property
    def model(self) -> str:
        return self.chosen["model"]

    @property
    def replicas(self) -> int:
        return int(self.chosen["replicas"])

    @property
    def cpu(self) -> float:
        return float(self.chosen["resources"]["cpu"])

    @property
    def memory_bytes(self) -> int:
        return int(self.chosen["resources"]["memory_bytes"])

    @property
    def sustainable_rate(self) -> float:
        return float(self.chosen["sustainable_rate"]["value"])

    @property
    def headroom(self) -> float:
        return float(self.doc["inputs"]["headroom"])

    @property
    def target_rps(self) -> int:
        """Per-replica autoscaling target: the sustainable rate x headroom, rounded down (KServe's
        scaleTarget is an integer; down keeps the p99 the plan measured)."""
        return max(1, math.floor(round(self.sustainable_rate * self.headroom, 6)))  # 180 x 0.7 is 125.999...


def load_plan(path) -> Plan:
    """Parse and check ``path``; UsageError (exit 2) naming the file and the key on any problem."""
    p = Path(path)
    fix = "write it with `retool plan REPO NAME --budget-p99-ms B --rate R` (it writes plan-NAME/plan.json)"
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise UsageError(f"{p}: plan file not found; {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{p}: cannot read the plan ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{p}: not JSON (line {exc.lineno}: {exc.msg}); {fix}") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        got = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
        raise UsageError(f"{p}: not a serving plan (kind {got!r}, expected {KIND!r}); {fix}")
    if doc.get("version") not in VERSIONS:
        raise UsageError(f"{p}: serving plan version {doc.get('version')!r} is not one this retool reads "
                         f"({', '.join(map(str, VERSIONS))}); rewrite it with this retool's `retool plan`")
    if doc.get("chosen", {}) is None:  # retool plan writes chosen: null when nothing meets the budget
        closest = doc.get("closest") or {}
        miss = (f" (closest: {closest.get('label')}, over by {closest.get('over_budget_ms')} ms)"
                if closest else "")
        raise UsageError(f"{p}: this plan met no budget, so there is nothing to deploy{miss}; plan again with a "
                         f"looser --budget-p99-ms or a lower --rate")
    for key, kind in REQUIRED.items():
        try:
            v = _get(doc, key)
        except KeyError:
            if kind.endswith("?"):
                continue
            raise UsageError(f"{p}: missing key '{key}' in the serving plan; {fix}") from None
        if not _type_ok(v, kind):
            raise UsageError(f"{p}: key '{key}' is {v!r}, expected {_WHAT[kind]}; {fix}")
    if doc["inputs"]["headroom"] > 1:
        raise UsageError(f"{p}: key 'inputs.headroom' is {doc['inputs']['headroom']!r}, expected a fraction "
                         f"in (0, 1] of the sustainable rate")
    return Plan(p, doc)
