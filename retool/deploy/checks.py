"""Offline checks of generated manifests: KServe kinds by the kserve SDK's typed models, built-in
kinds by kubernetes-validate against the Kubernetes OpenAPI schemas.

The kserve 0.21 wheel declares protobuf<7 and a model server's worth of packages (fastapi, uvicorn,
pandas ...), and ``import kserve`` loads that server. retool pins protobuf 7, so the ``deploy``
extra installs kserve with ``--no-deps`` and imports only ``kserve.models`` (generated OpenAPI
classes that need six and urllib3): the package's ``__init__`` is bypassed, see ``kserve_models``.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import sys
import types
from typing import Any

from retool.errors import MissingDependency, ValidationFailed

#: Kubernetes version the built-in kinds are validated against (HPA autoscaling/v2 is GA since 1.23).
KUBE_VERSION = "1.30"

KSERVE_KINDS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
}
_PRIMITIVE = {"str": str, "int": int, "float": (int, float), "bool": bool, "object": object}


KSERVE_PIN = "kserve==0.21.0"


def _kserve_missing(package: str = "kserve") -> MissingDependency:
    exc = MissingDependency(package, "deploy", "validate KServe manifests")
    exc.message += (f"; then: pip install --no-deps {KSERVE_PIN} (its declared dependencies would move "
                    f"retool's protobuf pin)")
    return exc


@functools.lru_cache(maxsize=1)
def kserve_models() -> types.ModuleType:
    """``kserve.models`` without running ``kserve/__init__`` (which imports the model server)."""
    if "kserve" in sys.modules:  # a full kserve already imported (or hidden, None): use it
        try:
            return importlib.import_module("kserve.models")
        except ImportError:
            raise _kserve_missing() from None
    spec = importlib.util.find_spec("kserve")
    if spec is None or not spec.submodule_search_locations:
        raise _kserve_missing()
    pkg = types.ModuleType("kserve")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    sys.modules["kserve"] = pkg
    try:
        return importlib.import_module("kserve.models")
    except ImportError as exc:
        del sys.modules["kserve"]
        raise _kserve_missing(getattr(exc, "name", None) or "kserve") from None


def _kv():
    try:
        import kubernetes_validate
        from kubernetes_validate import utils
    except ImportError:
        raise MissingDependency("kubernetes-validate", "deploy", "validate Kubernetes manifests") from None
    return kubernetes_validate, utils


def _mm(v: str) -> tuple[int, int]:
    major, minor = str(v).lstrip("v").split(".")[:2]
    return int(major), int(minor)


def kube_version(text: str) -> str:
    """--kube-version as MAJOR.MINOR, one kubernetes-validate has schemas for (UsageError otherwise)."""
    from retool.errors import UsageError

    _, utils = _kv()
    known = sorted({_mm(v) for v in utils.all_versions()})
    try:
        want = _mm(text)
    except ValueError:
        want = None
    if want is None or not known[0] <= want <= known[-1]:
        raise UsageError(f"--kube-version {text!r}: give MAJOR.MINOR between {known[0][0]}.{known[0][1]} and "
                         f"{known[-1][0]}.{known[-1][1]} (the schemas kubernetes-validate has)")
    return f"{want[0]}.{want[1]}"


def _fail(where: str, msg: str) -> ValidationFailed:
    return ValidationFailed(f"{where}: {msg} (a retool bug or a bad flag value: nothing was written)")


@functools.lru_cache(maxsize=None)
def _definition_validator(type_name: str, version: str):
    """A jsonschema validator for one Kubernetes type named as the kserve SDK names it
    (V1ResourceRequirements, V1ObjectMeta, K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior)."""
    import jsonschema
    from referencing import Registry, Resource

    _, utils = _kv()
    m = re.fullmatch(r"K8sIoApi([A-Z][a-z]+)(V\d+(?:alpha\d+|beta\d+)?)(\w+)", type_name)
    if m:
        candidates = [f"{m[3].lower()}-{m[1].lower()}-{m[2].lower()}"]
    else:
        m = re.fullmatch(r"(V\d+(?:alpha\d+|beta\d+)?)(\w+)", type_name)
        if not m:
            return None
        candidates = [f"{m[2].lower()}-{m[1].lower()}", f"{m[2].lower()}-meta-{m[1].lower()}"]
    ver = [v for v in utils.all_versions() if _mm(v) <= _mm(version)][-1]
    folder = f"kubernetes-json-schema/v{ver}-local-strict"
    for name in candidates:
        try:
            schema = utils.schema_contents(f"{folder}/{name}.json", version)
        except FileNotFoundError:
            continue
        defs = utils.schema_contents(f"{folder}/_definitions.json", version)
        registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
        return jsonschema.validators.Draft202012Validator(schema, registry=registry)
    return None


def _k8s_part(data: Any, type_name: str, where: str, version: str) -> Any:
    v = _definition_validator(type_name, version)
    if v is None:
        raise _fail(where, f"no Kubernetes schema for {type_name}")
    err = next(iter(sorted(v.iter_errors(data), key=lambda e: list(e.path))), None)
    if err is not None:
        path = ".".join([where, *map(str, err.path)])
        raise _fail(path, err.message)
    return data


def _build(data: Any, klass: str, where: str, models, version: str) -> Any:
    """Deserialize ``data`` into the SDK's typed model ``klass``, strictly: unknown keys and wrong
    primitive types are errors (the SDK's own deserializer skips them silently)."""
    if klass.startswith("list["):
        if not isinstance(data, list):
            raise _fail(where, f"expected a list, got {type(data).__name__}")
        sub = klass[5:-1]
        return [_build(x, sub, f"{where}[{i}]", models, version) for i, x in enumerate(data)]
    if klass.startswith("dict("):
        if not isinstance(data, dict):
            raise _fail(where, f"expected a mapping, got {type(data).__name__}")
        sub = re.match(r"dict\(([^,]*), (.*)\)", klass).group(2)
        return {k: _build(v, sub, f"{where}.{k}", models, version) for k, v in data.items()}
    if klass in _PRIMITIVE:
        t = _PRIMITIVE[klass]
        if (isinstance(data, bool) and klass != "bool" and klass != "object") or not isinstance(data, t):
            raise _fail(where, f"expected {klass}, got {data!r}")
        return data
    cls = getattr(models, klass, None)
    if cls is None:  # a Kubernetes type embedded in a KServe kind
        return _k8s_part(data, klass, where, version)
    if not isinstance(data, dict):
        raise _fail(where, f"expected a {klass} mapping, got {data!r}")
    by_json = {j: a for a, j in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(by_json))
    if unknown:
        raise _fail(f"{where}.{unknown[0]}", f"unknown field of {klass}")
    kwargs = {by_json[k]: _build(v, cls.openapi_types[by_json[k]], f"{where}.{k}", models, version)
              for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # the SDK's required-field and enum checks
        raise _fail(where, f"{klass}: {exc}") from None


def check_kserve(doc: dict, version: str = KUBE_VERSION):
    """The typed SDK object for a KServe manifest; ValidationFailed on any problem."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in KSERVE_KINDS:
        raise _fail(str(doc.get("kind")), f"not a KServe kind retool writes: {key}")
    models = kserve_models()
    where = f"{doc['kind']}/{(doc.get('metadata') or {}).get('name')}"
    return _build(doc, KSERVE_KINDS[key], where, models, version)


def check_builtin(doc: dict, version: str = KUBE_VERSION) -> str:
    """Validate a built-in kind (Deployment, Service, HPA ...) strictly; returns the schema version used."""
    kubernetes_validate, _ = _kv()
    where = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    try:
        return kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise _fail(".".join([where, *map(str, exc.path)]), exc.message) from None
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise _fail(where, exc.message) from None


def check(doc: dict, version: str = KUBE_VERSION) -> None:
    """One manifest, whichever kind."""
    if (doc.get("apiVersion"), doc.get("kind")) in KSERVE_KINDS:
        check_kserve(doc, version)
    else:
        check_builtin(doc, version)
