"""Caffe (deploy .prototxt + .caffemodel) -> ONNX, built node by node; OpenCV dnn is the reference."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from retool.converter.base import Converter, ConvertRequest, ExportResult, SourceModel, merge_specs
from retool.deps import version_of
from retool.errors import ConversionError, UsageError
from retool.types import TensorSpec

DEFAULT_OPSET = 17
OPSETS = range(13, 22)
#: Types that carry learned blobs, so a net using them needs --weights.
LEARNABLE = {"Convolution", "Deconvolution", "InnerProduct", "BatchNorm", "PReLU", "Normalize"}
#: Training-only layers: a hint that the user passed a train_val prototxt.
TRAINING_TYPES = {"Data", "ImageData", "MemoryData", "DummyData", "HDF5Data", "WindowData", "Accuracy",
                  "SoftmaxWithLoss", "EuclideanLoss", "SigmoidCrossEntropyLoss", "HingeLoss", "InfogainLoss",
                  "MultinomialLogisticLoss", "ContrastiveLoss"}


class CaffeConverter(Converter):
    name = "caffe"
    extra = "caffe"

    def sniff(self, source: Any) -> str | None:
        if not isinstance(source, (str, Path)):
            return None
        p = Path(source)
        if p.suffix == ".prototxt":
            return f"{p.name} has the .prototxt suffix"
        if p.suffix == ".caffemodel":
            return f"{p.name} has the .caffemodel suffix"
        if p.is_file() and p.suffix in ("", ".txt", ".pbtxt"):
            try:
                with open(p, "rb") as f:
                    head = f.read(4096)
            except OSError:
                return None
            if b"\0" not in head and re.search(rb"^\s*layers?\s*\{", head, re.M):
                return f"{p.name} is text with Caffe layer blocks"
        return None

    def load(self, request: ConvertRequest) -> SourceModel:
        from retool.converter.caffe.reader import build_net, read_caffemodel, read_prototxt

        path = Path(request.source)
        if not path.exists():
            raise UsageError(f"{path}: model file not found")
        if path.suffix == ".caffemodel":
            raise UsageError(f"{path}: is the weights file; pass the deploy .prototxt as SOURCE and this file "
                             f"as --weights")
        opset = request.opset or DEFAULT_OPSET
        if opset not in OPSETS:
            raise UsageError(f"--opset {opset}: the Caffe converter writes opsets {OPSETS.start}-{OPSETS.stop - 1}")
        proto = read_prototxt(path)
        weights = Path(request.weights) if request.weights else None
        model = read_caffemodel(weights) if weights else None
        net = build_net(proto, model, path=path)
        _check_types(net, path)
        if weights is None:
            needs = [L for L in net.layers if L.type in LEARNABLE or (L.type in ("Scale", "Bias") and len(L.bottoms) == 1)]
            if needs and not any(L.blobs for L in needs):
                raise UsageError(f"{path}: layer {needs[0].name!r} ({needs[0].type}) has learned weights; "
                                 f"pass the .caffemodel with --weights")
        return CaffeSource(path, weights, net, request, opset)


def _check_types(net, path: Path) -> None:
    from retool.converter.caffe.layers import HANDLERS

    for L in net.layers:
        if L.type in HANDLERS:
            continue
        hint = (" (a training-only layer: use the deploy prototxt)" if L.type in TRAINING_TYPES else
                f"; supported types: {', '.join(sorted(HANDLERS))}")
        raise ConversionError(f"{path}: layer {L.name!r} has type {L.type!r}, which retool cannot convert{hint}")


class CaffeSource(SourceModel):
    framework = "caffe"

    def __init__(self, prototxt: Path, weights: Path | None, net, request: ConvertRequest, opset: int):
        self.prototxt = prototxt
        self.weights = weights
        self.net = net
        self.request = request
        self.opts = dict(request.options or {})
        self.static_batch = bool(self.opts.get("static_batch"))
        self.source_files = tuple(p for p in (prototxt, weights) if p)
        self.versions = {"onnx": version_of("onnx") or "", "protobuf": version_of("protobuf") or "",
                         "opencv": version_of("opencv-python-headless") or ""}
        self.input_specs = self._resolve_specs()
        self.warnings: list[str] = []
        self.folded = 0
        self.opset = opset
        self.model = self._build(opset)
        self._reference = None
        self._reference_note: str | None = None
        from retool.converter.caffe.reference import opencv_divergences

        self.divergences = opencv_divergences(self.net.layers) + [
            f"layer {n!r}: OpenCV cannot read blobs stored as double_data" for n in self.net.double_data_layers[:3]]

    # -- inputs ---------------------------------------------------------------------------
    def _resolve_specs(self) -> tuple[TensorSpec, ...]:
        declared = []
        for name, shape in self.net.inputs:
            dims = list(shape)
            if dims and not self.static_batch:
                dims[0] = "batch"
            declared.append(TensorSpec(name, "float32", tuple(dims)))
        specs = merge_specs(declared, self.request.inputs)
        known = {n for n, _ in self.net.inputs}
        for s in specs:
            if s.name not in known:
                raise UsageError(f"--input {s.name}: the net has no input of that name; its inputs are "
                                 f"{', '.join(sorted(known))}")
            if s.dtype != "float32":
                raise UsageError(f"--input {s.name}: Caffe inputs are float32, not {s.dtype}")
            if not s.shape:
                raise UsageError(f"{self.prototxt}: input {s.name!r} has no declared shape; give it with "
                                 f"--input {s.name}:float32:batch,C,H,W")
            if any(not isinstance(d, int) for d in s.shape[1:]):
                raise UsageError(f"--input {s.name}: only the batch axis may be dynamic in a Caffe net "
                                 f"(got {s.shape})")
        return specs

    def _concrete_inputs(self) -> list[tuple[str, tuple[int, ...]]]:
        declared = dict(self.net.inputs)
        out = []
        for s in self.input_specs:
            dims = list(s.shape)
            if not isinstance(dims[0], int):
                d0 = declared.get(s.name, (1,))
                dims[0] = d0[0] if d0 and isinstance(d0[0], int) and d0[0] > 0 else 1
            out.append((s.name, tuple(int(d) for d in dims)))
        return out

    # -- building ---------------------------------------------------------------------------
    def _build(self, opset: int):
        import onnx
        from onnx import TensorProto, helper

        from retool.converter.caffe.detection import DETECTIONS_DIM
        from retool.converter.caffe.builder import Builder
        from retool.converter.caffe.layers import HANDLERS

        label = str(self.weights) if self.weights else "the prototxt (no --weights given)"
        layers = self.net.layers
        if self.opts.get("fold_batchnorm"):
            from retool.converter.caffe.fold import fold_batchnorm

            layers, self.folded = fold_batchnorm(list(layers), {o.tensor for o in self.net.outputs}, label)
            if not self.folded:
                self.warnings.append("--fold-batchnorm: no Convolution -> BatchNorm pair could be folded")
        b = Builder(opset, label)
        graph_inputs = []
        for spec, (name, shape) in zip(self.input_specs, self._concrete_inputs()):
            b.set(name, shape, batched=True)
            dims = [d if isinstance(d, int) else "batch" for d in spec.shape]
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
        for L in layers:
            missing = [t for t in L.bottoms if t not in b.shapes]
            if missing:
                raise ConversionError(f"{self.prototxt}: layer {L.name!r} ({L.type}) reads {missing[0]!r}, "
                                      f"which was dropped or never produced")
            HANDLERS[L.type](b, L)
        dynamic = any(s.has_dynamic_batch for s in self.input_specs)
        graph_outputs = []
        for o in self.net.outputs:
            if o.tensor not in b.shapes:
                continue  # e.g. a Silence-only tensor
            shape = list(b.shapes[o.tensor])
            if dynamic and b.batched.get(o.tensor) and shape:
                shape[0] = "batch"
            shape = [d if not isinstance(d, int) or d >= 0 else DETECTIONS_DIM for d in shape]
            graph_outputs.append(helper.make_tensor_value_info(o.tensor, TensorProto.FLOAT, shape))
        if not graph_outputs:
            raise ConversionError(f"{self.prototxt}: the net has no outputs")
        self.output_pins = [(o.layer, o.index) for o in self.net.outputs if o.tensor in b.shapes]
        self.output_tensors = [o.tensor for o in self.net.outputs if o.tensor in b.shapes]
        graph = helper.make_graph(b.nodes, self.net.name or self.prototxt.stem, graph_inputs, graph_outputs,
                                  b.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="retool.caffe", ir_version=min(onnx.IR_VERSION, 8))
        return model

    # -- SourceModel ----------------------------------------------------------------------------
    def export(self, path: Path, opset: int | None) -> ExportResult:
        import onnx

        if opset and opset != self.opset:
            if opset not in OPSETS:
                raise UsageError(f"--opset {opset}: the Caffe converter writes opsets {OPSETS.start}-{OPSETS.stop - 1}")
            self.model, self.opset = self._build(opset), opset
        large = self.model.ByteSize() > 1_900_000_000 if _small_enough(self.model) else True
        onnx.save_model(self.model, str(path), save_as_external_data=large,
                        location=path.name + ".data" if large else None)
        warnings = list(self.warnings)
        ref_err = self._reference_problem()
        if ref_err:
            warnings.append(ref_err)
        dyn = any(s.has_dynamic_batch for s in self.input_specs)
        return ExportResult("retool.caffe", {"opset": self.opset, "layers": len(self.net.layers),
                                             "dynamic_batch": dyn, "fold_batchnorm": self.folded,
                                             "external_data": large,
                                             "reference": "numpy" if ref_err else "opencv.dnn"},
                            tuple(warnings))

    def _reference_problem(self) -> str | None:
        """Why OpenCV is not the reference for this net (then the NumPy reference is), or None."""
        if self._reference_note is None:
            self._reference_note = ""
            if self.divergences:
                self._reference_note = ("OpenCV is not a faithful Caffe reference for this net ("
                                        + "; ".join(self.divergences) + ")")
            else:
                try:
                    ref = self._ref_opencv()
                    ref.run({n: np.zeros(shape, np.float32) for n, shape in self._concrete_inputs()})
                except Exception as exc:  # not installed, cannot load the net, or cannot run it
                    self._reference_note = f"OpenCV cannot run this net ({exc})"
            if self._reference_note:
                self._reference_note += "; parity is checked against retool's NumPy Caffe reference instead"
        return self._reference_note or None

    def _ref_opencv(self):
        if self._reference is None:
            from retool.converter.caffe.reference import OpenCVReference

            self._reference = OpenCVReference(self.prototxt, self.weights, self.output_pins)
        return self._reference

    def custom_parity(self) -> dict:
        from retool.converter.caffe.detection_parity import comparators

        return comparators(self.net, self.output_tensors)

    def extra_checks(self, feeds_list, tol) -> list:
        from retool.converter.caffe.detection_parity import head_checks

        return head_checks(self, feeds_list, tol)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if self._reference_problem():
            from retool.converter.caffe.reference_numpy import NumpyReference

            return NumpyReference(self.net, self.output_tensors).run(feeds)
        return self._ref_opencv().run(feeds)


def _small_enough(model) -> bool:
    """ByteSize itself fails past 2 GB on some protobuf backends."""
    total = sum(t.ByteSize() if not t.raw_data else len(t.raw_data) for t in model.graph.initializer)
    return total < 1_900_000_000
