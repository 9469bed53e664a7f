"""Budgets a candidate must meet, from flags or a small YAML file.

```yaml
max_p99_ms: 25            # every measured batch size; or per batch: {1: 5, 8: 25}
min_speedup: 1.2          # reference p50 / candidate p50; or per batch
max_size_mb: 100          # file plus external data, MB = 10^6 bytes
not_slower: true          # quantized candidates: not slower than the reference beyond the noise
                          # (default on for int8/uint8; false switches it off, and the report says so)
parity:                   # tolerances per output; "*" applies to every output
  "*":    {atol: 1.0e-4, rtol: 1.0e-3, min_cosine: 0.9999}
  logits: {atol: null, min_cosine: 0.99, min_top1: 0.98}   # null switches a limit off
undecided: fail           # a latency gate whose interval straddles its threshold, after decide_budget_s:
                          # pass or fail; or per gate {min_speedup: fail, max_p99_ms: fail, not_slower: pass}
                          # (those are the defaults; validators/decide_gates.py says why)
decide_budget_s: 5        # extra seconds of timing per batch size while a latency gate is undecided
```

Latency gates are decided on confidence intervals (retool.speed, validators/decide_gates.py).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from retool.errors import UsageError
from retool.types import CheckResult
from retool.validators.parity import Tolerance

_TOL_KEYS = {f.name for f in dataclasses.fields(Tolerance)}
_KEYS = ("max_p99_ms", "min_speedup", "max_size_mb", "parity", "not_slower", "undecided", "decide_budget_s")
_UNDECIDED_KINDS = ("min_speedup", "max_p99_ms", "not_slower")


@dataclass(frozen=True)
class Gates:
    """``None`` means no gate. Latency budgets are one number, or a mapping batch size -> number."""

    max_p99_ms: float | Mapping[int, float] | None = None
    min_speedup: float | Mapping[int, float] | None = None
    max_size_mb: float | None = None
    #: output name (or "*") -> the tolerance fields to override, e.g. {"atol": 1e-3}
    parity: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)
    #: None: on for quantized candidates (validators/speed_gate.py); True/False: on/off for any candidate
    not_slower: bool | None = None
    #: "pass"/"fail" for every latency gate, or gate kind -> "pass"/"fail"; None: the defaults
    #: (validators/decide_gates.py: fail for min_speedup and max_p99_ms, pass for not_slower)
    undecided: str | Mapping[str, str] | None = None
    #: extra seconds of timing per batch size while a latency gate is undecided; None: the default
    decide_budget_s: float | None = None

    def __hash__(self):  # holds mappings
        return hash(repr(self.to_dict()))

    @property
    def needs_latency(self) -> bool:
        return self.max_p99_ms is not None or self.min_speedup is not None

    def merged(self, **overrides) -> "Gates":
        """These gates with the non-None ``overrides`` (command-line flags beat the file)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def tolerance(self, output: str, base: Tolerance) -> Tolerance:
        """The tolerance for ``output``: ``base``, then the "*" entry, then the output's own entry."""
        tol = base
        for key in ("*", output):
            if key in self.parity:
                tol = dataclasses.replace(tol, **dict(self.parity[key]))
        return tol

    def to_dict(self) -> dict:
        def plain(v):
            return {int(k): float(x) for k, x in v.items()} if isinstance(v, Mapping) else v

        return {"max_p99_ms": plain(self.max_p99_ms), "min_speedup": plain(self.min_speedup),
                "max_size_mb": self.max_size_mb, "parity": {k: dict(v) for k, v in self.parity.items()},
                "not_slower": self.not_slower,
                "undecided": dict(self.undecided) if isinstance(self.undecided, Mapping) else self.undecided,
                "decide_budget_s": self.decide_budget_s}


def load_gates(source: "str | Path | Mapping | Gates | None") -> Gates:
    """Gates from a YAML file path, a mapping with the keys above, a Gates, or None (no gates)."""
    if source is None:
        return Gates()
    if isinstance(source, Gates):
        return source
    where = "gates"
    if isinstance(source, (str, Path)):
        from retool.yamlfile import load

        p = Path(source)
        where = str(p)
        if not p.is_file():
            raise UsageError(f"{p}: gates file not found; give a YAML file with {', '.join(_KEYS)}")
        data = load(p, "gates file")[0] or {}  # no aliases, duplicate keys or deep nesting
    else:
        data = source
    if not isinstance(data, Mapping):
        raise UsageError(f"{where}: expected a mapping with keys {', '.join(_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - set(_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown gate key(s) {unknown}; known: {', '.join(_KEYS)}")
    return Gates(
        max_p99_ms=_budget(data.get("max_p99_ms"), "max_p99_ms", where),
        min_speedup=_budget(data.get("min_speedup"), "min_speedup", where),
        max_size_mb=_number(data.get("max_size_mb"), "max_size_mb", where),
        parity=_parity(data.get("parity"), where),
        not_slower=_flag(data.get("not_slower"), "not_slower", where),
        undecided=_undecided(data.get("undecided"), where),
        decide_budget_s=_number(data.get("decide_budget_s"), "decide_budget_s", where),
    )


def _undecided(v, where: str):
    def one(x, key):
        if x not in ("pass", "fail"):
            raise UsageError(f"{where}: {key} must be pass or fail, got {x!r}")
        return x

    if v is None:
        return None
    if isinstance(v, Mapping):
        bad = sorted(set(map(str, v)) - set(_UNDECIDED_KINDS))
        if bad:
            raise UsageError(f"{where}: undecided: unknown gate(s) {bad}; known: {', '.join(_UNDECIDED_KINDS)}")
        return {str(k): one(x, f"undecided.{k}") for k, x in v.items()}
    return one(v, "undecided")


def _flag(v, key: str, where: str) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    raise UsageError(f"{where}: {key} must be true or false, got {v!r}")


def _number(v, key: str, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise UsageError(f"{where}: {key} must be a number, got {v!r}")
    try:
        x = float(v)
    except ValueError:
        raise UsageError(f"{where}: {key} must be a number, got {v!r}") from None
    if not math.isfinite(x) or x < 0:
        raise UsageError(f"{where}: {key} must be a finite number >= 0, got {v!r}")
    return x


def _budget(v, key: str, where: str):
    if isinstance(v, Mapping):
        out = {}
        for b, x in v.items():
            try:
                batch = int(b)
            except (TypeError, ValueError):
                raise UsageError(f"{where}: {key} keys are batch sizes, got {b!r}") from None
            out[batch] = _number(x, f"{key}[{b}]", where)
        return out
    return _number(v, key, where)


def _parity(v, where: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise UsageError(f"{where}: parity must map output names (or \"*\") to tolerances such as {{atol: 1e-4}}")
    out = {}
    for name, tol in v.items():
        if not isinstance(tol, Mapping):
            raise UsageError(f"{where}: parity.{name} must be a mapping such as {{atol: 1e-4, min_cosine: 0.999}}")
        bad = sorted(set(map(str, tol)) - _TOL_KEYS)
        if bad:
            raise UsageError(f"{where}: parity.{name}: unknown key(s) {bad}; known: {', '.join(sorted(_TOL_KEYS))}")
        out[str(name)] = {k: _number(x, f"parity.{name}.{k}", where) for k, x in tol.items()}
    return out


def _for_batch(budget, batch: int):
    if isinstance(budget, Mapping):
        return budget.get(batch)
    return budget


def gate_checks(gates: Gates, *, size_mb: float, latency: Mapping[str, Any] | None) -> list[CheckResult]:
    """Size and latency gates. ``latency`` is Report.data["latency"] (candidate/reference/speedup)."""
    checks = []
    if gates.max_size_mb is not None:
        ok = size_mb <= gates.max_size_mb
        checks.append(CheckResult("size", ok, size_mb, gates.max_size_mb,
                                  "" if ok else f"{size_mb:.2f} MB > {gates.max_size_mb:g} MB",
                                  {"unit": "MB", "op": "<="}))
    checks += latency_gate_checks(gates, latency)
    return checks


def latency_gate_checks(gates: Gates, latency: Mapping[str, Any] | None) -> list[CheckResult]:
    """p99 and speed-up gates, each a decision on an interval (validators/decide_gates.py)."""
    lat = latency or {}
    cand = lat.get("candidate", {})
    checks = []
    for key in sorted(cand, key=int):
        batch = int(key)
        for name, d in _decisions(gates, lat, batch).items():
            if name.startswith("not-slower@"):
                continue
            checks.append(_check(name, d, gates))
    if isinstance(gates.max_p99_ms, Mapping):
        for batch in sorted(set(gates.max_p99_ms) - {int(k) for k in cand}):
            checks.append(CheckResult(f"latency:p99@batch{batch}", False, None, gates.max_p99_ms[batch],
                                      f"batch {batch} was not measured; add it to --batch-sizes",
                                      {"unit": "ms", "op": "<="}))
    if gates.min_speedup is not None:
        wanted = (sorted(gates.min_speedup) if isinstance(gates.min_speedup, Mapping)
                  else sorted(int(k) for k in cand))
        have = {c.name for c in checks}
        for batch in wanted:
            limit = _for_batch(gates.min_speedup, batch)
            if limit is None or f"speedup@batch{batch}" in have:
                continue
            checks.append(CheckResult(f"speedup@batch{batch}", False, None, limit,
                                      "no reference latency at this batch size; give --reference and --batch-sizes",
                                      {"unit": "x", "op": ">="}))
    return checks


def _decisions(gates: Gates, lat: Mapping, batch: int) -> dict:
    """The stored decisions at ``batch``, or (decoder reports) ones judged on the kept samples."""
    from retool.validators import decide_gates as dg

    stored = (lat.get("decisions") or {}).get(str(batch))
    if stored is not None:
        return {n: dg.from_stored(d) for n, d in stored.items()}
    samples = {k: (lat.get(k) or {}).get(str(batch), {}).get("samples_ms") for k in ("candidate", "reference")}
    return dg.decisions_at(batch, {k: v for k, v in samples.items() if v}, gates, not_slower=False)


def _check(name: str, d, gates: Gates) -> CheckResult:
    from retool.validators import decide_gates as dg

    final = dg.resolved(name, d, gates)
    unit = "ms" if name.startswith("latency:") else "x"
    op = "<=" if name.startswith("latency:") else ">=" if name.startswith("speedup@") else "not slower"
    msg = "" if d.outcome == "pass" else final.text
    return CheckResult(name, final.outcome == "pass", round(d.estimate, 6), d.threshold, msg,
                       {"unit": unit, "op": op, "outcome": d.outcome, "decision": final.to_dict(),
                        "interval": d.to_dict()["interval"]})
