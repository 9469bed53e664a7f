"""Serving profiles: the configuration a budget search chose, with the measurement that chose it.

Written by ``retool loadtest --budget-p99-ms`` and read by ``retool publish --serving-profile``,
which puts ``config`` into config.pbtxt and ``measurement`` into the manifest.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from retool.errors import UsageError

PROFILE_KIND = "retool-serving-profile"
#: bounds a config.pbtxt can hold and a CPU can use (Triton's fields are int32/uint64)
MAX_INSTANCES = 1024
MAX_THREADS = 1024
MAX_QUEUE_DELAY_US = 10**9
_COUNT = {"type": "integer", "minimum": 1}
PROFILE_SCHEMA = {
    "type": "object",
    "required": ["kind", "config"],
    "properties": {
        "kind": {"const": PROFILE_KIND},
        "version": {"type": "integer"},
        "model": {"type": ["string", "null"]},
        "config": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "instance_count": {**_COUNT, "maximum": MAX_INSTANCES},
                "intra_op_thread_count": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_THREADS},
                "dynamic_batching": {"type": "boolean"},
                "max_queue_delay_microseconds": {"type": "integer", "minimum": 0, "maximum": MAX_QUEUE_DELAY_US},
                "preferred_batch_size": {"type": "array", "maxItems": 64,
                                         "items": {**_COUNT, "maximum": 2**31 - 1}},
            },
        },
        "measurement": {"type": ["object", "null"]},
    },
}


@dataclass(frozen=True)
class ServingConfig:
    """One point of the search space: what goes into config.pbtxt."""

    instance_count: int = 1
    intra_op_thread_count: int | None = None  # None: ORT's default (all cores)
    dynamic_batching: bool = False
    max_queue_delay_microseconds: int = 0
    preferred_batch_size: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return self.label_for()

    def label_for(self, cores: int | None = None) -> str:
        """The label; ORT's default thread count is spelt out as one thread per core (of ``cores``, or of
        the cores this process may use, which a server started from it inherits)."""
        import os

        n = cores or len(os.sched_getaffinity(0))
        thr = f"{n} thr (ORT default)" if self.intra_op_thread_count is None else f"{self.intra_op_thread_count} thr"
        txt = f"{self.instance_count} inst x {thr}"
        if self.dynamic_batching:
            pref = f", pref {'/'.join(map(str, self.preferred_batch_size))}" if self.preferred_batch_size else ""
            txt += f", batching {self.max_queue_delay_microseconds} us{pref}"
        else:
            txt += ", no batching"
        return txt

    def triton(self, max_batch_size: int) -> dict:
        """The manifest's ``triton`` settings that write_config turns into config.pbtxt."""
        out: dict[str, Any] = {"instance_count": int(self.instance_count)}
        if self.intra_op_thread_count:
            out["parameters"] = {"intra_op_thread_count": str(int(self.intra_op_thread_count)),
                                 "inter_op_thread_count": "1"}
        if self.dynamic_batching and max_batch_size > 1:
            out["dynamic_batching"] = {"max_queue_delay_microseconds": int(self.max_queue_delay_microseconds),
                                       "preferred_batch_size": list(self.preferred_batch_size)}
        else:
            out["dynamic_batching"] = False
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preferred_batch_size"] = list(self.preferred_batch_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "ServingConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["preferred_batch_size"] = tuple(int(b) for b in known.get("preferred_batch_size") or ())
        return cls(**known)


@dataclass(frozen=True)
class ServingProfile:
    model: str
    config: ServingConfig
    measurement: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": PROFILE_KIND, "version": 1, "model": self.model, "config": self.config.to_dict(),
                "measurement": dict(self.measurement)}

    def save(self, path) -> Path:
        from retool.fsutil import atomic_write_text
        from retool.types import jsonable

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, json.dumps(jsonable(self.to_dict()), indent=2) + "\n")
        return p


def load_profile(src) -> ServingProfile:
    if isinstance(src, ServingProfile):
        return src
    if isinstance(src, Mapping):
        data, where = dict(src), "serving profile"
    else:
        p = Path(src).expanduser()
        where = str(p)
        if not p.is_file():
            raise UsageError(f"{p}: serving profile not found; write one with retool loadtest --budget-p99-ms "
                             f"X --profile-out FILE")
        try:
            data = json.loads(p.read_text())
        except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
            raise UsageError(f"{p}: not a serving profile (bad JSON: {exc})") from None
    check_schema(data, where)
    cfg = ServingConfig.from_dict({k: (int(v) if isinstance(v, float) else v) for k, v in data["config"].items()})
    return ServingProfile(str(data.get("model") or ""), cfg, dict(data.get("measurement") or {}))


def check_schema(data, where: str) -> None:
    """One line naming the file and the first bad field (UsageError, exit 2)."""
    try:
        import jsonschema
    except ImportError:
        from retool.errors import MissingDependency

        raise MissingDependency("jsonschema", "serve", "check a serving profile") from None
    if not isinstance(data, Mapping) or data.get("kind") != PROFILE_KIND:
        raise UsageError(f"{where}: not a serving profile (a JSON object with kind {PROFILE_KIND!r} and config); "
                         f"write one with retool loadtest --budget-p99-ms X --profile-out FILE")
    err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(PROFILE_SCHEMA).iter_errors(data))
    if err is None:
        return
    field = ".".join(str(x) for x in err.absolute_path) or "(top level)"
    if err.validator == "additionalProperties":
        known = list(err.schema.get("properties", {}))
        extra = sorted(k for k in err.instance if k not in known)
        field = f"{field}.{extra[0]}" if extra else field
        what = f"unknown field (known: {', '.join(known)})"
    else:
        got = json.dumps(err.instance)
        what = f"{got if len(got) <= 40 else got[:37] + '...'}: {err.message.split(' is ', 1)[-1][:120]}"
    raise UsageError(f"{where}: {field}: {what}; fix the field or write a new profile with retool loadtest "
                     f"--budget-p99-ms X --profile-out FILE")


def serving_settings(model_path, profile, max_batch_size: int, name: str | None = None) -> dict:
    """What publish adds to the manifest's ``triton``: a profile's config and measurement, or the
    optimiser's thread count hint (ONNX metadata ``retool.intra_op_threads``) as the default."""
    if profile is None:
        from retool.serve.samples import intra_op_hint

        hint = intra_op_hint(model_path)
        if not hint:
            return {}
        return {"parameters": {"intra_op_thread_count": str(hint)},
                "intra_op_source": "ONNX metadata retool.intra_op_threads"}
    prof = load_profile(profile)
    if prof.model and name and prof.model != name:
        from retool import console

        console.warn(f"the serving profile was measured for {prof.model!r}, publishing {name!r}; recorded")
    out = prof.config.triton(max_batch_size)
    out["serving_profile"] = {"model": prof.model, "config": prof.config.to_dict(),
                              "measurement": dict(prof.measurement)}
    return out
