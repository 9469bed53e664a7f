"""Keras models (Keras 3 ``.keras`` and ``.h5``, tf_keras, in memory) as traced TensorFlow sources.

Trust: a Lambda layer or a custom object is Python code, refused without --trust-remote-code.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

from retool.converter.base import ConvertRequest
from retool.converter.keras_load import lean_keras_load
from retool.converter.tf_source import (TFSource, _is_hdf5, _module_names, _resolve_specs, _select_outputs,
                                           _spec_from_shape)
from retool.converter.tf_export import import_tf
from retool.deps import version_of
from retool.errors import ConversionError, TrustRequired, UsageError
from retool.refs import import_ref

def _keras_flavor(model) -> str:
    return "tf_keras" if any(m.startswith("tf_keras") for m in _module_names(model)) else "keras"


def _keras_output_names(model) -> list[str]:
    outs = list(getattr(model, "outputs", None) or [])
    names = list(getattr(model, "output_names", None) or [])
    if names and len(names) == len(outs):
        return _dedupe(names)
    res = []
    for t in outs:
        hist = getattr(t, "_keras_history", None)
        layer = getattr(hist, "operation", None) or getattr(hist, "layer", None)
        res.append(getattr(layer, "name", None) or str(t.name).split("/")[0].split(":")[0])
    return _dedupe(res)


def _dedupe(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            n = f"{n}_{seen[n]}"
        else:
            seen[n] = 0
        out.append(n)
    return out


def keras_source(model, request: ConvertRequest, files=()) -> TFSource:
    import_tf()
    flavor = _keras_flavor(model)
    try:
        inputs = list(model.inputs or [])
    except (AttributeError, ValueError):  # a Sequential model that was never built
        inputs = []
    names = list(getattr(model, "input_names", None) or []) if flavor == "tf_keras" else []
    if len(names) != len(inputs):
        names = [str(t.name).split(":")[0] for t in inputs]
    pack = None
    keyed = _keyed_inputs(model, flavor)
    if keyed is not None:  # dict inputs: ONNX inputs are named by key, the call gets the dict back
        names, inputs, pack = keyed
    declared = tuple(_spec_from_shape(n, t.dtype, t.shape) for n, t in zip(names, inputs))
    specs = _resolve_specs(declared, request)
    if pack is not None and [s.name for s in specs] != names:
        raise UsageError(f"{request.source_label}: the model takes a dict of inputs {names}; --input and "
                         f"--example-inputs must use those keys")
    if inputs:
        out_names = _keras_output_names(model)
    else:
        out_names = []
    single_in = len(specs) == 1

    def call(*args):
        out = model(pack(args) if pack else args[0] if single_in else list(args), training=False)
        if isinstance(out, Mapping):
            return dict(out)
        flat = list(out) if isinstance(out, (list, tuple)) else [out]
        names_ = out_names if len(out_names) == len(flat) else (
            ["output"] if len(flat) == 1 else [f"output_{i}" for i in range(len(flat))])
        return dict(zip(names_, flat))

    if not out_names or isinstance(getattr(model, "output", None), Mapping):
        tf = import_tf()
        sig = [tf.TensorSpec([d if isinstance(d, int) else None for d in s.shape], tf.as_dtype(s.dtype))
               for s in specs]
        out_names = list(tf.function(call, autograph=False).get_concrete_function(*sig).structured_outputs)
    versions = {flavor: version_of(flavor) or ""}
    return TFSource(request, flavor, call, specs, _select_outputs(out_names, request), files, versions,
                    owner=model, batch_outputs=True)


def _keyed_inputs(model, flavor: str):
    """(names, tensors, pack) for a model whose inputs are a dict (possibly nested), else None.

    Names are the keys (``a.b`` when nested), in the order Keras flattens the structure,
    which is the order of ``model.inputs``; ``pack`` rebuilds the dict from flat tensors."""
    try:
        struct = model.input
    except (AttributeError, ValueError):
        return None
    if not isinstance(struct, Mapping):
        return None
    if flavor == "keras":
        import keras

        pairs = keras.tree.flatten_with_path(struct)

        def pack(args):
            return keras.tree.pack_sequence_as(struct, list(args))
    else:
        tf = import_tf()
        def walk(x, path):  # tf.nest's order: dict keys sorted
            if isinstance(x, Mapping):
                return [pt for k in sorted(x) for pt in walk(x[k], path + (k,))]
            if isinstance(x, (list, tuple)):
                return [pt for i, v in enumerate(x) for pt in walk(v, path + (i,))]
            return [(path, x)]

        pairs = walk(struct, ())
        if [id(t) for _, t in pairs] != [id(t) for t in tf.nest.flatten(struct)]:
            return None

        def pack(args):
            return tf.nest.pack_sequence_as(struct, list(args))
    names = [".".join(str(k) for k in path) for path, _ in pairs]
    return names, [t for _, t in pairs], pack


def _custom_objects(request: ConvertRequest, flavor: str) -> dict:
    out: dict = {}
    for ref in (request.options or {}).get("custom_objects") or ():
        obj = import_ref(ref, "--custom-objects")
        if isinstance(obj, Mapping):
            out.update(obj)
            continue
        out[getattr(obj, "__name__", ref.rpartition(":")[2])] = obj
        if flavor == "keras":
            import keras

            out[keras.saving.get_registered_name(obj)] = obj
    return out


def _code_objects(config) -> list[str]:
    """Lambda layers and custom (non-Keras) classes/functions named in a saved Keras config."""
    found: list[str] = []

    def walk(x):
        if isinstance(x, Mapping):
            cls = x.get("class_name")
            if isinstance(cls, str):
                module = x.get("module")
                if cls in ("Lambda", "__lambda__"):
                    found.append("Lambda")
                elif isinstance(module, str) and not module.startswith(("keras", "tf_keras", "tensorflow", "builtins")):
                    found.append(x.get("registered_name") or cls)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(config)
    return sorted(set(found))


def _refuse_untrusted(path: Path, config, request: ConvertRequest) -> None:
    if request.trust_remote_code:
        return
    code = _code_objects(config)
    if code:
        raise TrustRequired(
            f"{path}: holds {', '.join(code)} whose Python code runs on load (Keras safe mode refuses it); "
            f"re-run with --trust-remote-code if you trust its origin"
            + ("" if code == ["Lambda"] else ", plus --custom-objects MODULE:ATTR for the custom classes"))


def _load_failure(path: Path, exc: Exception, what: str, request: ConvertRequest):
    text = " ".join(str(exc).split())
    low = text.lower()
    if "safe_mode" in low or "lambda" in low and "deserializ" in low:
        return TrustRequired(f"{path}: Keras safe mode refuses to load it ({text[:200]}); re-run with "
                             f"--trust-remote-code if you trust its origin")
    if "unknown layer" in low or "could not locate" in low or "unknown object" in low or "custom_objects" in low:
        import re

        name = re.search(r"(?:Could not locate (?:class|function)|Unknown \w+:?) '?([\w.>]+)'?", text)
        module = next((m for m in re.findall(r"'module': '([\w.]+)'", text)
                       if not m.startswith(("keras", "tf_keras"))), None)
        cls = name.group(1).split(">")[-1] if name else "NAME"
        hint = f"{module or 'MODULE'}:{cls}"
        return UsageError(f"{path}: uses custom Keras object {cls if name else '(unknown)'}, which is not "
                          f"importable here; pass --custom-objects {hint} --trust-remote-code")
    return ConversionError(f"{path}: cannot load as {what} ({type(exc).__name__}: {text[:300]}); "
                           f"the file may be truncated or corrupt")


def load_keras_archive(path: Path, request: ConvertRequest) -> TFSource:
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if "config.json" not in names:
                raise ConversionError(f"{path}: not a Keras archive (no config.json inside); "
                                      f"re-save it with model.save('model.keras')")
            config = json.loads(z.read("config.json"))
            meta = json.loads(z.read("metadata.json")) if "metadata.json" in names else {}
            weights_size = z.getinfo("model.weights.h5").file_size if "model.weights.h5" in names else 0
    except ConversionError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as exc:
        raise ConversionError(f"{path}: not a valid .keras archive ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]}); the file may be truncated or corrupt; "
                              f"re-save it with model.save('model.keras')") from None
    _refuse_untrusted(path, config, request)
    flavor = "tf_keras" if str(meta.get("keras_version", "")).startswith("2.") else "keras"
    import_tf()
    keras = _import_keras(flavor)
    custom = _custom_objects(request, flavor)
    try:
        with lean_keras_load(flavor, weights_size):
            model = keras.models.load_model(str(path), custom_objects=custom or None, compile=False,
                                            safe_mode=not request.trust_remote_code)
    except Exception as exc:
        raise _load_failure(path, exc, "a Keras model", request) from None
    return keras_source(model, request, files=(path,))


def _import_keras(flavor: str):
    from retool.deps import require

    return require("tf_keras" if flavor == "tf_keras" else "keras", "tensorflow", "load Keras models")


def load_h5(path: Path, request: ConvertRequest) -> TFSource:
    if not _is_hdf5(path):
        raise ConversionError(f"{path}: not an HDF5 file (bad signature); the file may be truncated or corrupt, "
                              f"or not a Keras .h5 model")
    import_tf()
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            version = f.attrs.get("keras_version", "")
    except Exception as exc:
        raise ConversionError(f"{path}: cannot read the HDF5 file ({type(exc).__name__}); "
                              f"it may be truncated or corrupt") from None
    if raw is None:
        raise ConversionError(f"{path}: an HDF5 file without a Keras model in it (no model_config; weights only?); "
                              f"save the whole model with model.save('model.keras') or model.save('model.h5')")
    raw = raw.decode() if isinstance(raw, bytes) else str(raw)
    version = version.decode() if isinstance(version, bytes) else str(version)
    try:
        config = json.loads(raw)
    except ValueError:
        raise ConversionError(f"{path}: its model_config is not valid JSON; the file is corrupt") from None
    _refuse_untrusted(path, config, request)
    flavor = "tf_keras" if version.startswith("2.") else "keras"
    keras = _import_keras(flavor)
    custom = _custom_objects(request, flavor)
    try:
        kwargs = {"safe_mode": not request.trust_remote_code} if flavor == "keras" else {}
        model = keras.models.load_model(str(path), custom_objects=custom or None, compile=False, **kwargs)
    except Exception as exc:
        raise _load_failure(path, exc, "a Keras HDF5 model", request) from None
    return keras_source(model, request, files=(path,))
