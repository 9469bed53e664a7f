"""TensorFlow / Keras -> ONNX with tf2onnx, verified against TensorFlow.

Source forms: SavedModel folder (also Keras ``model.export()``), frozen GraphDef
``.pb``, Keras 3 ``.keras``, legacy ``.h5`` (Keras 3 or tf_keras), and in-memory
Keras models (keras 3 or tf_keras), ``tf.function``s and loaded SavedModels.
Everything but a GraphDef is traced as one ``tf.function`` with named TensorSpecs
that returns a dict, so tf2onnx keeps the model's input and output names (and
never meets a Sequential model, whose Keras 3 tracing breaks tf2onnx.from_keras).
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from retool.converter.base import Converter, ConvertRequest, ExportResult, SourceModel, merge_specs
from retool.converter import tf_export
from retool.converter.keras_load import lean_keras_load
from retool.converter.tf_export import (check_opset, finalize, from_function, import_tf, import_tf2onnx,
                                        run_tf2onnx)
from retool.deps import version_of
from retool.errors import ConversionError, TrustRequired, UsageError
from retool.refs import import_ref
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
            return _load_keras_archive(path, request)
        if suffix in (".h5", ".hdf5") or _is_hdf5(path):
            return _load_h5(path, request)
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

    def export(self, path: Path, opset: int | None) -> ExportResult:
        import_tf2onnx()
        opset = check_opset(opset)
        fn, sig = self.function(), self._signature()
        nchw = [f"{n}:0" for n in sorted(self.nchw)] or None
        label = self.request.source_label
        large = self.weight_bytes() > tf_export.LARGE_MODEL_BYTES
        variables = self._variables() if large else ()
        proto, storage = run_tf2onnx(lambda: from_function(fn, sig, opset, nchw, large_model=large,
                                                           variables=variables), label, opset)
        finalize(proto, self.input_specs, self.output_names, path, self.batch_outputs, storage)
        del proto, storage
        variables = ()  # the lambda's cell: let the variables go with the model
        return ExportResult("tf2onnx.convert.from_function", {"source_kind": self.kind, "opset": opset,
                                                             "inputs_as_nchw": sorted(self.nchw),
                                                             "external_data": large})

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


# -- Keras -----------------------------------------------------------------------

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


def _keras_source(model, request: ConvertRequest, files=()) -> TFSource:
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


def _load_keras_archive(path: Path, request: ConvertRequest) -> TFSource:
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
    return _keras_source(model, request, files=(path,))


def _import_keras(flavor: str):
    from retool.deps import require

    return require("tf_keras" if flavor == "tf_keras" else "keras", "tensorflow", "load Keras models")


def _load_h5(path: Path, request: ConvertRequest) -> TFSource:
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
    return _keras_source(model, request, files=(path,))


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
        raise UsageError(f"{label}: the SavedModel has no signatures; re-save it with "
                         f"tf.saved_model.save(obj, dir, signatures=...)")
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
        return _keras_source(obj, request)
    if isinstance(obj, tf.types.experimental.ConcreteFunction) or hasattr(obj, "get_concrete_function"):
        return _function_source(obj, request)
    if getattr(obj, "signatures", None):
        return _signature_source(obj, request, (), type(obj).__name__)
    raise UsageError(f"{type(obj).__name__}: expected a Keras model, a tf.function or a loaded SavedModel")


def _function_source(fn, request: ConvertRequest) -> TFSource:
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

    return TFSource(request, "tf.function", call, specs, _select_outputs(out_names, request))
