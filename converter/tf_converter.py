"""TensorFlow / Keras -> ONNX with tf2onnx, verified against TensorFlow.

Source forms: SavedModel folder (also Keras ``model.export()``), frozen GraphDef
``.pb``, Keras 3 ``.keras``, legacy ``.h5`` (Keras 3 or tf_keras), and in-memory
Keras models (keras 3 or tf_keras), ``tf.function``s and loaded SavedModels.
Everything but a GraphDef is traced as one ``tf.function`` with named TensorSpecs
that returns a dict, so tf2onnx keeps the model's input and output names (and
never meets a Sequential model, whose Keras 3 tracing breaks tf2onnx.from_keras).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from retool.converter.base import Converter, ConvertRequest, SourceModel
from retool.converter.tf_export import check_opset, import_tf
from retool.converter.tf_source import (TFSource, _is_hdf5, _module_names, _resolve_specs, _select_outputs,
                                        _spec_from_shape)
from retool.errors import ConversionError, TrustRequired, UsageError

SAVEDMODEL_MARKERS = ("saved_model.pb", "saved_model.pbtxt")
#: Files a SavedModel folder has besides saved_model.pb: enough to claim a broken one.
SAVEDMODEL_HINTS = ("variables", "fingerprint.pb", "keras_metadata.pb", "assets")


class TensorFlowConverter(Converter):
    name = "tensorflow"
    extra = "tensorflow"

    def sniff(self, source: Any) -> str | None:
        if isinstance(source, (str, Path)):
            p = Path(source)
            if p.is_dir():
                if any((p / m).is_file() for m in SAVEDMODEL_MARKERS):
                    return f"{p.name} is a TF SavedModel folder"
                if any((p / m).exists() for m in SAVEDMODEL_HINTS):
                    return f"{p.name} looks like a TF SavedModel folder"
                return None
            if not p.is_file():
                return None
            suffix = p.suffix.lower()
            if p.name in SAVEDMODEL_MARKERS:
                return f"{p.name} is a TF SavedModel's graph"
            if suffix == ".keras":
                return f"{p.name} is a Keras archive"
            if suffix in (".h5", ".hdf5") or _is_hdf5(p):
                return f"{p.name} is a Keras HDF5 file"
            if suffix in (".pb", ".pbtxt"):
                return f"{p.name} is a TF GraphDef"
            return None
        mods = _module_names(source)
        if any(m.startswith(("keras", "tf_keras", "tensorflow")) for m in mods):
            return "an in-memory Keras model or TensorFlow function"
        return None

    def load(self, request: ConvertRequest) -> SourceModel:
        check_opset(request.opset, request.source_label)
        opts = request.options or {}
        if opts.get("custom_objects") and not request.trust_remote_code:
            raise TrustRequired(f"{request.source_label}: --custom-objects imports Python code; "
                                f"add --trust-remote-code if you trust that code")
        src = request.source
        if not isinstance(src, (str, Path)):
            return _load_object(src, request)
        path = Path(src)
        if not path.exists():
            raise UsageError(f"{path}: model file not found")
        if path.is_dir():
            return _load_saved_model(path, request)
        if path.name in SAVEDMODEL_MARKERS:
            return _load_saved_model(path.parent, request)
        suffix = path.suffix.lower()
        if opts.get("signature"):
            raise UsageError(f"{path}: --signature applies to SavedModel folders only")
        if suffix == ".keras":
            from retool.converter.tf_keras import load_keras_archive

            return load_keras_archive(path, request)
        if suffix in (".h5", ".hdf5") or _is_hdf5(path):
            from retool.converter.tf_keras import load_h5

            return load_h5(path, request)
        if suffix in (".pb", ".pbtxt"):
            from retool.converter.tf_graphdef import load_graphdef

            return load_graphdef(path, request)
        raise ConversionError(f"{path}: not a TensorFlow/Keras model (expected a SavedModel folder, "
                              f".pb, .keras or .h5)")


# -- SavedModel, tf.function ----------------------------------------------------------

def _load_saved_model(path: Path, request: ConvertRequest) -> TFSource:
    if not any((path / m).is_file() for m in SAVEDMODEL_MARKERS):
        raise UsageError(f"{path}: not a complete SavedModel folder (saved_model.pb is missing); "
                         f"point at the folder that tf.saved_model.save or model.export() wrote")
    tf = import_tf()
    try:
        obj = tf.saved_model.load(str(path))
    except Exception as exc:
        raise ConversionError(f"{path}: cannot load the SavedModel ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]})") from None
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return _signature_source(obj, request, files, str(path))


def _signature_source(obj, request: ConvertRequest, files, label: str) -> TFSource:
    sigs = dict(getattr(obj, "signatures", {}) or {})
    name = (request.options or {}).get("signature") or "serving_default"
    if not sigs:
        return _unsigned_source(obj, request, files, label)
    if name not in sigs:
        raise UsageError(f"{label}: no signature {name!r}; available: {', '.join(sorted(sigs))} (pass --signature)")
    fn = sigs[name]
    args, kwargs = fn.structured_input_signature
    in_names = list(kwargs)
    declared = tuple(_spec_from_shape(k, v.dtype, v.shape) for k, v in kwargs.items())
    specs = _resolve_specs(declared, request)
    outs = fn.structured_outputs
    # a signature's outputs are a map: sorted is the order TF itself flattens them in
    out_names = sorted(outs) if isinstance(outs, Mapping) else ["output"]

    def call(*tensors):
        out = fn(**dict(zip(in_names, tensors)))
        return dict(out) if isinstance(out, Mapping) else {"output": out}

    return TFSource(request, f"saved_model[{name}]", call, specs, _select_outputs(out_names, request), files,
                    owner=obj)


def _load_object(obj, request: ConvertRequest) -> TFSource:
    tf = import_tf()
    mods = _module_names(obj)
    if any(m.startswith(("keras", "tf_keras")) for m in mods):
        from retool.converter.tf_keras import keras_source

        return keras_source(obj, request)
    if isinstance(obj, tf.types.experimental.ConcreteFunction) or hasattr(obj, "get_concrete_function"):
        return _function_source(obj, request)
    if getattr(obj, "signatures", None):
        return _signature_source(obj, request, (), type(obj).__name__)
    raise UsageError(f"{type(obj).__name__}: expected a Keras model, a tf.function or a loaded SavedModel")


def _traced_specs(fn) -> list:
    """The input TensorSpecs a restored tf.function was traced for (one list per concrete function)."""
    out = []
    for c in getattr(fn, "concrete_functions", None) or []:
        args, kwargs = c.structured_input_signature
        out.append([a for a in import_tf().nest.flatten((args, kwargs)) if hasattr(a, "shape")])
    return out


def _unsigned_source(obj, request: ConvertRequest, files, label: str) -> TFSource:
    """A SavedModel without signatures (TF-Hub style) converts through its restored ``__call__``, whose
    inputs --input declares (a restored function has no input_signature to read them from)."""
    fn = getattr(obj, "__call__", None)
    if not hasattr(fn, "get_concrete_function"):
        raise UsageError(f"{label}: the SavedModel has no signatures and no restored __call__; re-save it with "
                         f"tf.saved_model.save(obj, dir, signatures=...)")
    traced = _traced_specs(fn)
    if not request.inputs:
        first = traced[0] if traced else []
        eg = " ".join(f"--input {s.name or f'input_{i}'}:{s.dtype.name}:" + ",".join(
            str(d) if d is not None else ("batch" if j == 0 else f"d{j}") for j, d in enumerate(s.shape.as_list()))
            for i, s in enumerate(first)) or "--input NAME:DTYPE:SHAPE"
        raise UsageError(f"{label}: the SavedModel has no signatures; its restored __call__ converts once --input "
                         f"declares its inputs, e.g. {eg}")
    try:
        return _function_source(fn, request, kind="saved_model[__call__]", files=files, owner=obj)
    except (ValueError, TypeError) as exc:
        seen = "; ".join(", ".join(f"{s.dtype.name}{s.shape.as_list()}" for s in t) for t in traced) or "none"
        raise UsageError(f"{label}: its restored __call__ was not traced for --input "
                         f"{' '.join(str(s) for s in request.inputs)} (traced for: {seen}; "
                         f"{type(exc).__name__})") from None


def _function_source(fn, request: ConvertRequest, kind: str = "tf.function", files=(), owner=None) -> TFSource:
    tf = import_tf()
    if hasattr(fn, "structured_input_signature") and not hasattr(fn, "get_concrete_function"):
        args, _ = fn.structured_input_signature
        sig = [a for a in tf.nest.flatten(args)]
    else:
        sig = list(fn.input_signature or [])
    import inspect

    py = getattr(fn, "python_function", None)
    params = list(inspect.signature(py).parameters) if py else []
    names = [s.name or (params[i] if i < len(params) else f"input_{i}") for i, s in enumerate(sig)]
    declared = tuple(_spec_from_shape(n, s.dtype, s.shape) for n, s in zip(names, sig))
    specs = _resolve_specs(declared, request)
    tf_sig = [tf.TensorSpec([d if isinstance(d, int) else None for d in s.shape], tf.as_dtype(s.dtype))
              for s in specs]
    concrete = fn if not hasattr(fn, "get_concrete_function") else fn.get_concrete_function(*tf_sig)
    outs = concrete.structured_outputs
    if isinstance(outs, Mapping):
        out_names = list(outs)
    else:
        flat = tf.nest.flatten(outs)
        out_names = ["output"] if len(flat) == 1 else [f"output_{i}" for i in range(len(flat))]

    def call(*tensors):
        out = concrete(*tensors)
        if isinstance(out, Mapping):
            return dict(out)
        return dict(zip(out_names, tf.nest.flatten(out)))

    return TFSource(request, kind, call, specs, _select_outputs(out_names, request), files, owner=owner)
