"""The pipeline file: load YAML with line numbers, validate against a small schema.

Errors name the file, the line and the field, and suggest the nearest valid key.
Unknown keys are errors, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from retool.commands.common import (BATCH_SIZE, CONCURRENCY, CORES, COSINE, COST_PER_HOUR, FRACTION, HEADROOM,
                                    MILLISECONDS, OPSET,
                                    PERCENTILE, RATE, RUNS, SAMPLES, SIZE_MB, SPEEDUP, THREADS, TIME_BUDGET_S,
                                    TOLERANCE as TOL, WINDOW_MS, Number)
from retool.errors import UsageError
from retool.publish.names import check_model_name
from retool.yamlfile import Located as _Located
from retool.yamlfile import fmt_path as _fmt_path
from retool.yamlfile import load as load_strict

PUBLISH_WHEN = ("gates-pass", "always", "never")
REFERENCES = ("fp32", "source")


# --- schema ---------------------------------------------------------------------------------
# A schema is a dict key -> (type, required); nested dicts/lists via Obj/ListOf.
@dataclass(frozen=True)
class Obj:
    fields: Mapping[str, tuple[Any, bool]]
    #: a bare string is accepted in place of the object and stored under this key
    shorthand: str | None = None


@dataclass(frozen=True)
class ListOf:
    item: Any


@dataclass(frozen=True)
class OneOf:
    values: tuple


@dataclass(frozen=True)
class MapOf:
    value: Any


#: numbers are retool.commands.common.Number ranges: the flags and this file accept the same values
TOLERANCE = Obj({"atol": (TOL, False), "rtol": (TOL, False), "min_cosine": (COSINE, False),
                 "min_top1": (FRACTION, False)})
GATES = Obj({"max_p99_ms": (MILLISECONDS, False), "min_speedup": (SPEEDUP, False), "max_size_mb": (SIZE_MB, False),
             "parity": (MapOf(TOLERANCE), False), "not_slower": (bool, False),
             "undecided": (OneOf(("pass", "fail")), False), "decide_budget_s": (TIME_BUDGET_S, False)})
CALIBRATION = Obj({"data": (str, False), "method": (OneOf(("minmax", "entropy", "percentile")), False),
                   "preprocess": (str, False), "percentile": (PERCENTILE, False), "samples": (SAMPLES, False),
                   "heldout": (SAMPLES, False)},
                  shorthand="data")
PUBLISH = Obj({"when": (OneOf(PUBLISH_WHEN), False), "alias": (str, False), "repository": (str, False),
               "name": (str, False), "force": (bool, False), "signing": (Obj({"key": (str, True), "cert": (str, False)}, shorthand="key"), False)})
#: after publish: load in a real Triton (check), load-test, and pick the config for a p99 budget (its own gate)
SERVE = Obj({"check": (bool, False), "load": (bool, False), "budget_p99_ms": (MILLISECONDS, False),
             "rate": (RATE, False), "cost_per_hour": (COST_PER_HOUR, False), "currency": (str, False),
             "space": (OneOf(("small", "quick", "full")), False), "concurrency": (ListOf(CONCURRENCY), False),
             "window_ms": (WINDOW_MS, False), "url": (str, False)})
TARGET = Obj({"name": (str, True), "tolerance": (TOLERANCE, False), "gates": (GATES, False),
              "calibration": (CALIBRATION, False), "publish": (PUBLISH, False),
              "accuracy": (str, False), "serve": (SERVE, False), "options": (MapOf(object), False)},
             shorthand="name")
#: after serve: the serving plan for the model's family (retool plan), its own gate
PLAN = Obj({"budget_p99_ms": (MILLISECONDS, True), "rate": (RATE, True),
            "profile": (OneOf(("realtime", "throughput")), False), "price_per_hour": (COST_PER_HOUR, False),
            "currency": (str, False), "cores_per_replica": (CORES, False), "headroom": (HEADROOM, False),
            "space": (OneOf(("small", "quick", "full")), False), "window_ms": (WINDOW_MS, False)})
VALIDATION = Obj({"batch_sizes": (ListOf(BATCH_SIZE), False), "threads": (THREADS, False),
                  "latency": (bool, False), "reference": (OneOf(REFERENCES), False), "runs": (RUNS, False),
                  "min_time_s": (TIME_BUDGET_S, False)})
MODEL = Obj({
    "name": (str, True), "source": (str, True), "framework": (str, False), "weights": (str, False),
    "inputs": (ListOf(str), False), "example_inputs": (str, False), "opset": (OPSET, False),
    "options": (MapOf(object), False), "trust_remote_code": (bool, False),
    "targets": (ListOf(TARGET), False), "calibration": (CALIBRATION, False), "gates": (GATES, False),
    "validation": (VALIDATION, False), "publish": (PUBLISH, False), "repository": (str, False),
    "serve": (SERVE, False), "plan": (PLAN, False),
})
DEFAULTS = Obj({"targets": (ListOf(TARGET), False), "calibration": (CALIBRATION, False),
                "gates": (GATES, False), "validation": (VALIDATION, False), "publish": (PUBLISH, False),
                "serve": (SERVE, False)})
PIPELINE = Obj({"version": (int, False), "repository": (str, False), "defaults": (DEFAULTS, False),
                "models": (ListOf(MODEL), True)})


# --- typed config ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetConfig:
    name: str
    tolerance: Mapping[str, float] = field(default_factory=dict)
    gates: Mapping[str, Any] = field(default_factory=dict)
    calibration: Mapping[str, Any] = field(default_factory=dict)
    publish: Mapping[str, Any] = field(default_factory=dict)
    #: accuracy goal, e.g. "top1>=0.97,cos>=0.999" (retool.optimizers.goal)
    accuracy: str | None = None
    serve: Mapping[str, Any] = field(default_factory=dict)
    #: weight-only target options, e.g. {algorithm: hqq} (optimizers.targets.with_options)
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        """The name with its options, as ``--target`` takes it: ``cpu-int4:algorithm=hqq``."""
        opts = ",".join(f"{k}={'none' if v is None else v}" for k, v in self.options.items())
        return f"{self.name}:{opts}" if opts else self.name


@dataclass(frozen=True)
class ModelConfig:
    name: str
    source: str
    framework: str = "auto"
    weights: str | None = None
    inputs: tuple[str, ...] = ()
    example_inputs: str | None = None
    opset: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
    targets: tuple[TargetConfig, ...] = ()
    validation: Mapping[str, Any] = field(default_factory=dict)
    repository: str | None = None
    plan: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineConfig:
    models: tuple[ModelConfig, ...]
    path: Path | None = None
    base_dir: Path = Path(".")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- loading ----------------------------------------------------------------------------------
def load_yaml(path: Path) -> tuple[Any, _Located]:
    data, loc = load_strict(path, "pipeline file")
    if data is None:
        raise UsageError(f"{path}: the pipeline file is empty; it needs at least 'models:'")
    return data, loc


def _check(value, schema, path: tuple, loc: _Located, src: str):
    def where(at) -> str:
        line = None
        probe = at
        while probe and line is None:
            line = loc.lines.get(probe)
            probe = probe[:-1]
        line = line or loc.lines.get((), 1)
        return f"{src}:{line}: {_fmt_path(at)}"

    def fail(msg, at=path):
        raise UsageError(f"{where(at)}: {msg}")

    if isinstance(schema, Obj):
        if isinstance(value, str) and schema.shorthand:
            return {schema.shorthand: value}
        if not isinstance(value, dict):
            fail(f"expected a mapping, got {type(value).__name__}")
        out = {}
        for k, v in value.items():
            if k not in schema.fields:
                hint = difflib.get_close_matches(str(k), list(schema.fields), n=1, cutoff=0.5)
                tip = f"; did you mean '{hint[0]}'?" if hint else f"; valid keys: {', '.join(schema.fields)}"
                fail(f"unknown key '{k}'{tip}", path + (k,))
            out[k] = _check(v, schema.fields[k][0], path + (k,), loc, src)
        for k, (_, required) in schema.fields.items():
            if required and k not in value:
                fail(f"missing required key '{k}'")
        return out
    if isinstance(schema, ListOf):
        if not isinstance(value, list):
            fail(f"expected a list, got {type(value).__name__}")
        return [_check(v, schema.item, path + (i,), loc, src) for i, v in enumerate(value)]
    if isinstance(schema, MapOf):
        if not isinstance(value, dict):
            fail(f"expected a mapping, got {type(value).__name__}")
        return {k: _check(v, schema.value, path + (k,), loc, src) for k, v in value.items()}
    if isinstance(schema, OneOf):
        if value not in schema.values:
            hint = difflib.get_close_matches(str(value), [str(v) for v in schema.values], n=1)
            tip = f"; did you mean '{hint[0]}'?" if hint else ""
            fail(f"'{value}' is not one of {', '.join(map(str, schema.values))}{tip}")
        return value
    if isinstance(schema, Number):
        return schema.check(value, where(path))
    if schema is object:
        return value
    types = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(value, bool) and bool not in types:
        fail(f"expected {'/'.join(t.__name__ for t in types)}, got a boolean")
    if not isinstance(value, types):
        fail(f"expected {'/'.join(t.__name__ for t in types)}, got {type(value).__name__} {value!r}")
    return value


def _merge(*dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in (d or {}).items():
            out[k] = _merge(out.get(k), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_config(data: Any, src: str = "<config>", loc: _Located | None = None,
                 base_dir: Path = Path(".")) -> PipelineConfig:
    """Validate ``data`` (parsed YAML or a dict from the Python API) into a PipelineConfig."""
    loc = loc or _Located()
    doc = _check(data, PIPELINE, (), loc, src)
    if doc.get("version", 1) != 1:
        raise UsageError(f"{src}: version {doc['version']} is not supported; this retool reads version 1")
    defaults = doc.get("defaults", {})
    repo_default = doc.get("repository")
    models, names = [], set()
    for i, m in enumerate(doc["models"]):
        try:  # the name becomes a folder under --out and a model in the repository
            check_model_name(m["name"])
        except UsageError as exc:
            raise UsageError(f"{src}:{loc.lines.get(('models', i, 'name'), '?')}: models[{i}].name: {exc}") from None
        if m["name"] in names:
            raise UsageError(f"{src}:{loc.lines.get(('models', i, 'name'), '?')}: models[{i}].name: "
                             f"'{m['name']}' is used twice; model names must be unique")
        names.add(m["name"])
        tlist = m.get("targets", defaults.get("targets")) or [{"name": "cpu"}]
        targets = []
        for t in tlist:
            targets.append(TargetConfig(
                t["name"],
                dict(t.get("tolerance", {})),
                _merge(defaults.get("gates"), m.get("gates"), t.get("gates")),
                _merge(defaults.get("calibration"), m.get("calibration"), t.get("calibration")),
                _merge({"when": "gates-pass"}, defaults.get("publish"), m.get("publish"), t.get("publish")),
                t.get("accuracy"),
                _merge(defaults.get("serve"), m.get("serve"), t.get("serve")),
                dict(t.get("options") or {}),
            ))
        from retool.optimizers.goal import parse_goal
        from retool.registry import TARGETS

        for j, t in enumerate(targets):
            try:
                parse_goal(t.accuracy)
            except UsageError as exc:
                line = loc.lines.get(("models", i, "targets", j, "accuracy"), "?")
                raise UsageError(f"{src}:{line}: models[{i}].targets[{j}].accuracy: {exc}") from None
            if t.name not in TARGETS:  # fail before any work, with the line of the bad name
                hint = difflib.get_close_matches(t.name, TARGETS.names(), n=1)
                tip = f"; did you mean '{hint[0]}'?" if hint else ""
                line = loc.lines.get(("models", i, "targets", j)) or loc.lines.get(("defaults", "targets", j), "?")
                raise UsageError(f"{src}:{line}: models[{i}].targets[{j}]: unknown target '{t.name}'{tip} "
                                 f"(known: {', '.join(TARGETS.names())})")
            if t.options:
                from retool.optimizers.targets import get_target

                try:
                    get_target(t.spec)
                except UsageError as exc:
                    line = loc.lines.get(("models", i, "targets", j, "options"), "?")
                    raise UsageError(f"{src}:{line}: models[{i}].targets[{j}].options: {exc}") from None
        tnames = [t.name for t in targets]
        if len(set(tnames)) != len(tnames):
            raise UsageError(f"{src}:{loc.lines.get(('models', i, 'targets'), '?')}: models[{i}].targets: "
                             f"a target is listed twice: {tnames}")
        models.append(ModelConfig(
            m["name"], m["source"], m.get("framework", "auto"), m.get("weights"), tuple(m.get("inputs", ())),
            m.get("example_inputs"), m.get("opset"), dict(m.get("options", {})),
            bool(m.get("trust_remote_code", False)), tuple(targets),
            _merge(defaults.get("validation"), m.get("validation")),
            m.get("repository") or (targets[0].publish.get("repository") if targets else None) or repo_default,
            plan=dict(m.get("plan") or {}),
        ))
    return PipelineConfig(tuple(models), None, base_dir)


def load_config(path) -> PipelineConfig:
    p = Path(path)
    data, loc = load_yaml(p)
    cfg = parse_config(data, str(p), loc, p.resolve().parent)
    return dataclasses.replace(cfg, path=p)
