"""What the TensorFlow converter's loaders share: the traced source (``TFSource``), TensorSpecs from TF
shapes, and the sniffing helpers. Below tf_converter (which picks a loader) and the loaders it picks
(tf_keras, tf_graphdef), so neither has to import the other."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from retool.converter import tf_export
from retool.converter.base import ConvertRequest, ExportResult, SourceModel, merge_specs
from retool.converter.tf_export import check_opset, finalize, from_function, import_tf, import_tf2onnx, run_tf2onnx
from retool.deps import version_of
from retool.errors import UsageError
from retool.types import TensorSpec

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


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
