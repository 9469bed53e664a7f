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
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from retool.converter.base import Converter, ConvertRequest, ExportResult, SourceModel, merge_specs
from retool.converter import tf_export
from retool.converter.tf_export import (check_opset, finalize, from_function, import_tf, import_tf2onnx,
                                        run_tf2onnx)
from retool.deps import version_of
from retool.errors import ConversionError, TrustRequired, UsageError
from retool.types import TensorSpec

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
SAVEDMODEL_MARKERS = ("saved_model.pb", "saved_model.pbtxt")
#: Files a SavedModel folder has besides saved_model.pb: enough to claim a broken one.
SAVEDMODEL_HINTS = ("variables", "fingerprint.pb", "keras_metadata.pb", "assets")


def _is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if head == HDF5_MAGIC:
                return True
            f.seek(512)  # HDF5 allows a user block of 512, 1024 ... bytes
            return f.read(8) == HDF5_MAGIC
    except OSError:
        return False


def _module_names(obj) -> list[str]:
    return [c.__module__ or "" for c in type(obj).__mro__]


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


# -- specs -------------------------------------------------------------------

def _dtype_name(dt) -> str:
    return str(getattr(dt, "name", dt)).replace("tf.", "")


def _spec_from_shape(name: str, dtype, shape) -> TensorSpec:
    dims: list = []
    for i, d in enumerate(list(shape) if shape is not None else []):
        d = getattr(d, "value", d)
        if d is None or (isinstance(d, int) and d < 0):
            dims.append("batch" if i == 0 else f"{name}_dim{i}")
        else:
            dims.append(int(d))
    return TensorSpec(name, _dtype_name(dtype), tuple(dims))


def _resolve_specs(declared: Sequence[TensorSpec], request: ConvertRequest) -> tuple[TensorSpec, ...]:
    if request.example_inputs:
        from retool.inputs import specs_from_arrays

        user = {s.name: s for s in request.inputs}
        given = tuple(user.get(s.name, s) for s in specs_from_arrays(request.example_inputs))
    else:
        given = request.inputs
    specs = merge_specs(declared, given)
    if not specs:
        raise UsageError(f"{request.source_label}: the model does not declare its inputs; give them with "
                         f"--input NAME:DTYPE:SHAPE (e.g. --input x:float32:batch,224,224,3)")
    unknown_rank = [s.name for s in specs if not s.shape]
    if unknown_rank:
        raise UsageError(f"{request.source_label}: the shape of input(s) {unknown_rank} is unknown; give it with "
                         f"--input NAME:DTYPE:SHAPE")
    return specs


def _select_outputs(available: Sequence[str], request: ConvertRequest) -> list[str]:
    wanted = (request.options or {}).get("output_names")
    if not wanted:
        return list(available)
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise UsageError(f"{request.source_label}: --output-names {unknown} not found; "
                         f"the model's outputs are: {', '.join(available)}")
    return list(wanted)


def _nchw(spec: TensorSpec) -> TensorSpec:
    s = spec.shape
    return TensorSpec(spec.name, spec.dtype, (s[0], s[3], s[1], s[2]))


# -- the traced source ---------------------------------------------------------

class TFSource(SourceModel):
    """A model reachable as ``call(*tensors) -> {output name: tensor}``; exported via one tf.function."""

    framework = "tensorflow"

    def __init__(self, request: ConvertRequest, kind: str, call: Callable, specs: Sequence[TensorSpec],
                 output_names: Sequence[str], files=(), extra_versions: Mapping[str, str] | None = None,
                 owner=None, batch_outputs: bool = False):
        tf = import_tf()
        self._owner = owner  # a loaded SavedModel frees its variables when this goes
        self.batch_outputs = batch_outputs
        self.tf = tf
        self.request = request
        self.kind = kind
        self._call = call
        self.src_specs = tuple(specs)  # as TF sees them (NHWC)
        self.output_names = list(output_names)
        self.nchw = {s.name for s in self.src_specs if len(s.shape) == 4} if (
            request.options or {}).get("inputs_as_nchw") else set()
        if (request.options or {}).get("inputs_as_nchw") and not self.nchw:
            raise UsageError(f"{request.source_label}: --inputs-as-nchw needs a 4-D (NHWC) input; "
                             f"inputs are {', '.join(str(s) for s in self.src_specs)}")
        self.input_specs = tuple(_nchw(s) if s.name in self.nchw else s for s in self.src_specs)
        self.source_files = tuple(Path(f) for f in files)
        self.versions = {"tensorflow": tf.__version__, "tf2onnx": version_of("tf2onnx") or "",
                         "onnx": version_of("onnx") or "", **(extra_versions or {})}
        self._fn = None

    def _signature(self):
        tf = self.tf
        return [tf.TensorSpec([d if isinstance(d, int) else None for d in s.shape], tf.as_dtype(s.dtype),
                              name=s.name) for s in self.src_specs]

    def function(self):
        if self._fn is None:
            names, call = self.output_names, self._call

            def traced(*args):
                out = call(*args)
                return {n: out[n] for n in names}

            self._fn = self.tf.function(traced, input_signature=self._signature(), autograph=False)
        return self._fn

    def source_precision(self) -> tuple[str, str]:
        """int8 when the traced graph fake-quantizes (a QAT model), else fp32."""
        from retool.converter.source_precision import graph_def_precision

        try:
            graph_def = self.function().get_concrete_function().graph.as_graph_def()
        except Exception:  # a function that cannot be traced here fails at export, with its own message
            return "fp32", ""
        return graph_def_precision(graph_def)

    def export(self, path: Path, opset: int | None) -> ExportResult:
        import_tf2onnx()
        opset = check_opset(opset)
        fn, sig = self.function(), self._signature()
        nchw = [f"{n}:0" for n in sorted(self.nchw)] or None
        label = self.request.source_label
        why = tf_export.weights_apart_reason(self.weight_bytes())
        large = why is not None
        variables = self._variables() if large else ()
        proto, storage = run_tf2onnx(lambda: from_function(fn, sig, opset, nchw, large_model=large,
                                                           variables=variables), label, opset)
        finalize(proto, self.input_specs, self.output_names, path, self.batch_outputs, storage)
        del proto, storage
        variables = ()  # the lambda's cell: let the variables go with the model
        return ExportResult("tf2onnx.convert.from_function", {"source_kind": self.kind, "opset": opset,
                                                             "inputs_as_nchw": sorted(self.nchw),
                                                             "external_data": large,
                                                             **({"external_data_reason": why} if why else {})})

    def _variables(self) -> list:
        """The model's variables (Keras weights, or a tf.Module's variables)."""
        owner = self._owner
        try:
            return list(getattr(owner, "weights", None) or getattr(owner, "variables", None) or [])
        except Exception:  # an object without a variable list: treat it as small
            return []

    def weight_bytes(self) -> int:
        total = 0
        for v in self._variables():
            dt = getattr(v.dtype, "size", None) or np.dtype(str(v.dtype)).itemsize
            total += int(np.prod([int(d) for d in v.shape])) * int(dt)
        return total

    def close(self) -> None:
        """Drop the model, its traced function and the concrete functions that capture its
        variables, so their memory is gone before onnxruntime loads the ONNX copy."""
        import gc

        if self._call is None:
            return
        self._owner = self._call = self._fn = None
        gc.collect()

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        tf = self.tf
        missing = [s.name for s in self.src_specs if s.name not in feeds]
        if missing:
            raise UsageError(f"inputs missing from the feeds: {missing}")
        out = self.function()(*[tf.constant(feeds[s.name]) for s in self.src_specs])
        return [np.asarray(out[n].numpy()) for n in self.output_names]

    def reference_feeds(self, feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        return {k: np.ascontiguousarray(np.transpose(v, (0, 2, 3, 1))) if k in self.nchw else v
                for k, v in feeds.items()}


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
