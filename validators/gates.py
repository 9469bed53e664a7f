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
```
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
_KEYS = ("max_p99_ms", "min_speedup", "max_size_mb", "parity", "not_slower")


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
                "not_slower": self.not_slower}


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
    )


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
    cand = (latency or {}).get("candidate", {})
    for key, stats in cand.items():
        batch = int(key)
        limit = _for_batch(gates.max_p99_ms, batch)
        if limit is not None:
            v = stats["p99_ms"]
            checks.append(CheckResult(f"latency:p99@batch{batch}", v <= limit, v, limit,
                                      "" if v <= limit else f"p99 {v:.3f} ms > {limit:g} ms",
                                      {"unit": "ms", "op": "<="}))
    if isinstance(gates.max_p99_ms, Mapping):
        for batch in sorted(set(gates.max_p99_ms) - {int(k) for k in cand}):
            checks.append(CheckResult(f"latency:p99@batch{batch}", False, None, gates.max_p99_ms[batch],
                                      f"batch {batch} was not measured; add it to --batch-sizes",
                                      {"unit": "ms", "op": "<="}))
    speed = (latency or {}).get("speedup", {})
    if gates.min_speedup is not None:
        wanted = (sorted(gates.min_speedup) if isinstance(gates.min_speedup, Mapping)
                  else sorted(int(k) for k in cand))
        for batch in wanted:
            limit = _for_batch(gates.min_speedup, batch)
            if limit is None:
                continue
            v = speed.get(str(batch))
            if v is None:
                checks.append(CheckResult(f"speedup@batch{batch}", False, None, limit,
                                          "no reference latency at this batch size; give --reference and --batch-sizes",
                                          {"unit": "x", "op": ">="}))
                continue
            checks.append(CheckResult(f"speedup@batch{batch}", v >= limit, v, limit,
                                      "" if v >= limit else f"{v:.2f}x < {limit:g}x", {"unit": "x", "op": ">="}))
    return checks
