"""Core value types. Each stage takes and returns these frozen dataclasses.

A ModelArtifact never changes: a stage that transforms a model *derives* a
new artifact, appending one ProvenanceStep to the chain.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

REPORT_SCHEMA_VERSION = "1.0"

Dim = "int | str | None"  # int = static, str = named dynamic axis, None = unnamed dynamic

_DTYPES = {
    "float32": "float32", "float": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "half": "float16", "fp16": "float16", "f16": "float16",
    "float64": "float64", "double": "float64", "fp64": "float64",
    "bfloat16": "bfloat16",
    "int64": "int64", "long": "int64", "i64": "int64",
    "int32": "int32", "int": "int32", "i32": "int32",
    "int16": "int16", "int8": "int8", "uint8": "uint8", "uint16": "uint16",
    "uint32": "uint32", "uint64": "uint64",
    "bool": "bool",
}

BATCH_NAMES = frozenset({"batch", "batch_size", "n", "b", "N", "B", "unk__batch"})


def normalize_dtype(name: str) -> str:
    key = str(name).strip().lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(sorted(set(_DTYPES.values())))}")
    return _DTYPES[key]


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor: dtype and a shape whose dims are int, a symbol, or None."""

    name: str
    dtype: str = "float32"
    shape: tuple = ()
    #: integer inputs: the inclusive (low, high) of valid values (e.g. token ids), when known
    value_range: tuple | None = None

    def __post_init__(self):
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(self.shape))
        if self.value_range is not None:
            object.__setattr__(self, "value_range", tuple(int(v) for v in self.value_range))

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.shape)

    @property
    def has_dynamic_batch(self) -> bool:
        return bool(self.shape) and not isinstance(self.shape[0], int)

    def concrete(self, batch: int = 1, default_dim: int = 8, sizes: Mapping[str, int] | None = None) -> tuple[int, ...]:
        """A concrete shape: batch axis -> ``batch``, other symbols -> ``sizes`` or ``default_dim``."""
        sizes = sizes or {}
        out = []
        for i, d in enumerate(self.shape):
            if isinstance(d, int) and d >= 0:
                out.append(d)
            elif i == 0:
                out.append(batch)
            elif isinstance(d, str) and d in sizes:
                out.append(int(sizes[d]))
            else:
                out.append(default_dim)
        return tuple(out)

    def with_batch(self, batch: "int | str | None") -> "TensorSpec":
        if not self.shape:
            return self
        return dataclasses.replace(self, shape=(batch,) + tuple(self.shape[1:]))

    def to_dict(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.value_range is not None:
            d["range"] = list(self.value_range)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "TensorSpec":
        return cls(d["name"], d.get("dtype", "float32"), tuple(d.get("shape", ())),
                   tuple(d["range"]) if d.get("range") is not None else None)

    @classmethod
    def parse(cls, text: str) -> "TensorSpec":
        """Parse ``NAME:DTYPE:SHAPE`` such as ``x:float32:batch,3,224,224``.

        DTYPE and SHAPE may be omitted from the right (``x:int64`` or ``x``);
        a dim is an int, a symbol (dynamic axis) or ``?``/``-1`` (unnamed dynamic).
        An integer input may end with its inclusive value range: ``ids:int64:batch,seq:0..30521``.
        Raises ValueError with a message fit for the user.
        """
        value_range, original = None, text
        head, sep, last = text.rpartition(":")
        if sep and ".." in last:
            m = re.fullmatch(r"\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*", last)
            if not m or int(m.group(1)) > int(m.group(2)):
                raise ValueError(f"input spec {text!r}: bad value range {last!r}; write LOW..HIGH (inclusive), "
                                 f"e.g. ids:int64:batch,seq:0..30521")
            value_range, text = (int(m.group(1)), int(m.group(2))), head
        parts = text.rsplit(":", 2) if text.count(":") >= 2 else text.split(":")
        if len(parts) > 1 and parts[1].strip().isdigit() and (len(parts) == 2 or not re.search(r"[,x?]|^\d+$", parts[2])):
            # a TF tensor name (``input:0``), then maybe a dtype: ``input:0:float32``
            parts = [f"{parts[0]}:{parts[1].strip()}"] + parts[2:]
        name = parts[0].strip()
        if not name:
            raise ValueError(f"input spec {text!r} has no name; expected NAME:DTYPE:SHAPE, e.g. x:float32:batch,3,224,224")
        dtype = parts[1].strip() if len(parts) > 1 and parts[1].strip() else "float32"
        try:
            dtype = normalize_dtype(dtype)
        except ValueError as exc:
            raise ValueError(f"input spec {text!r}: {exc}") from None
        shape: list = []
        if len(parts) > 2 and parts[2].strip():
            for tok in parts[2].replace("x", ",").split(",") if re.fullmatch(r"[0-9x]+", parts[2].strip()) else parts[2].split(","):
                tok = tok.strip()
                if re.fullmatch(r"\d+", tok):
                    shape.append(int(tok))
                elif tok in ("?", "-1", "None"):
                    shape.append(None)
                elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tok):
                    shape.append(tok)
                else:
                    raise ValueError(
                        f"input spec {text!r}: bad dimension {tok!r}; a dim is an integer, "
                        f"a name such as 'batch' for a dynamic axis, or '?'"
                    )
        if value_range is not None and not re.match(r"u?int|bool", dtype):
            raise ValueError(f"input spec {original!r}: a value range is for integer inputs, not {dtype}")
        return cls(name, dtype, tuple(shape), value_range)

    def __str__(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        rng = f":{self.value_range[0]}..{self.value_range[1]}" if self.value_range is not None else ""
        return f"{self.name}:{self.dtype}:{dims}{rng}"


@dataclass(frozen=True)
class ProvenanceStep:
    """One transformation in an artifact's history."""

    stage: str  # convert | optimize | validate | publish | ingest
    tool: str  # e.g. "torch.onnx.export(dynamo)"
    versions: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    input_sha256: str | None = None
    output_sha256: str | None = None
    started: str = ""
    seconds: float | None = None

    def to_dict(self) -> dict:
        return {
            "stage": self.stage, "tool": self.tool, "versions": dict(self.versions),
            "params": _jsonable(dict(self.params)), "input_sha256": self.input_sha256,
            "output_sha256": self.output_sha256, "started": self.started, "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "ProvenanceStep":
        return cls(d["stage"], d["tool"], dict(d.get("versions", {})), dict(d.get("params", {})),
                   d.get("input_sha256"), d.get("output_sha256"), d.get("started", ""), d.get("seconds"))


@dataclass(frozen=True)
class ModelArtifact:
    """A model file on disk plus what we know about it and how it came to be."""

    path: Path
    format: str  # onnx | torch | tensorflow | keras | caffe ...
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    opset: int | None = None
    precision: str = "fp32"  # fp32 | fp16 | int8 | uint8 | mixed
    target: str | None = None
    sha256: str | None = None
    provenance: tuple[ProvenanceStep, ...] = ()
    #: Other files that belong to the model (ONNX external data ...), relative to path's folder.
    extra_files: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "provenance", tuple(self.provenance))
        object.__setattr__(self, "extra_files", tuple(self.extra_files))

    def derive(self, path, step: ProvenanceStep, **changes) -> "ModelArtifact":
        """A new artifact made from this one by ``step``."""
        return dataclasses.replace(self, path=Path(path), provenance=self.provenance + (step,), **changes)

    @property
    def source_sha256(self) -> str | None:
        return self.provenance[0].input_sha256 if self.provenance else self.sha256

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.inputs) and all(s.has_dynamic_batch for s in self.inputs if s.shape)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "format": self.format,
            "inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs],
            "opset": self.opset, "precision": self.precision, "target": self.target,
            "sha256": self.sha256, "extra_files": list(self.extra_files),
            "provenance": [p.to_dict() for p in self.provenance],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelArtifact":
        return cls(
            Path(d["path"]), d["format"], tuple(TensorSpec.from_dict(x) for x in d.get("inputs", ())),
            tuple(TensorSpec.from_dict(x) for x in d.get("outputs", ())), d.get("opset"),
            d.get("precision", "fp32"), d.get("target"), d.get("sha256"),
            tuple(ProvenanceStep.from_dict(p) for p in d.get("provenance", ())), tuple(d.get("extra_files", ())),
        )


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: parity of one output, a latency gate, a size gate ..."""

    name: str
    passed: bool
    value: Any = None
    threshold: Any = None
    message: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    #: "gate" results decide pass/fail; "info" results are only reported.
    severity: str = "gate"

    def to_dict(self) -> dict:
        return {"name": self.name, "passed": bool(self.passed), "value": _jsonable(self.value),
                "threshold": _jsonable(self.threshold), "message": self.message,
                "details": _jsonable(dict(self.details)), "severity": self.severity}

    @classmethod
    def from_dict(cls, d: Mapping) -> "CheckResult":
        return cls(d["name"], d["passed"], d.get("value"), d.get("threshold"), d.get("message", ""),
                   dict(d.get("details", {})), d.get("severity", "gate"))


@dataclass(frozen=True)
class Report:
    """What a stage found. Serialises to versioned JSON."""

    stage: str
    artifact: ModelArtifact | None = None
    checks: tuple[CheckResult, ...] = ()
    #: Free-form, JSON-able measurements (timings, latency tables, versions ...).
    data: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    created: str = field(default_factory=lambda: now_iso())
    schema_version: str = REPORT_SCHEMA_VERSION

    def __post_init__(self):
        object.__setattr__(self, "checks", tuple(self.checks))
        object.__setattr__(self, "warnings", tuple(self.warnings))

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks if c.severity == "gate")

    @property
    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if c.severity == "gate" and not c.passed]

    def with_checks(self, checks: Iterable[CheckResult]) -> "Report":
        return dataclasses.replace(self, checks=self.checks + tuple(checks))

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version, "stage": self.stage, "passed": self.passed,
            "created": self.created,
            "artifact": self.artifact.to_dict() if self.artifact else None,
            "checks": [c.to_dict() for c in self.checks], "data": _jsonable(dict(self.data)),
            "warnings": list(self.warnings),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Report":
        return cls(
            d["stage"], ModelArtifact.from_dict(d["artifact"]) if d.get("artifact") else None,
            tuple(CheckResult.from_dict(c) for c in d.get("checks", ())), dict(d.get("data", {})),
            tuple(d.get("warnings", ())), d.get("created", ""), d.get("schema_version", REPORT_SCHEMA_VERSION),
        )

    @classmethod
    def load(cls, path) -> "Report":
        return cls.from_dict(json.loads(Path(path).read_text()))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _jsonable(x):
    """Best-effort conversion of numpy scalars/arrays, paths, tuples to JSON types."""
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, float):
        return x if x == x and x not in (float("inf"), float("-inf")) else str(x)
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if dataclasses.is_dataclass(x) and hasattr(x, "to_dict"):
        return x.to_dict()
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return _jsonable(x.item())
        if isinstance(x, np.ndarray):
            return _jsonable(x.tolist())
    except ImportError:  # pragma: no cover
        pass
    return str(x)


def jsonable(x):
    return _jsonable(x)
