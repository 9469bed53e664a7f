"""Read a deploy prototxt and a caffemodel into a flat list of layers with weights.

Handles TEST-phase filtering (include/exclude), in-place layers (each write of a
blob gets its own tensor name; the last write keeps the Caffe blob name), the
legacy V1 ``layers`` field with enum types, legacy 4-D blob dims and
``double_data``, and the three ways of declaring inputs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retool.errors import ConversionError, UsageError

V1_TYPES = {
    "ABSVAL": "AbsVal", "BNLL": "BNLL", "CONCAT": "Concat", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout", "ELTWISE": "Eltwise", "EXP": "Exp",
    "FLATTEN": "Flatten", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN", "POOLING": "Pooling",
    "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH", "THRESHOLD": "Threshold", "ARGMAX": "ArgMax",
    "ACCURACY": "Accuracy", "DATA": "Data", "IMAGE_DATA": "ImageData", "MEMORY_DATA": "MemoryData",
    "DUMMY_DATA": "DummyData", "HDF5_DATA": "HDF5Data", "WINDOW_DATA": "WindowData", "MVN": "MVN",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "EUCLIDEAN_LOSS": "EuclideanLoss", "IM2COL": "Im2col",
}


@dataclass
class Layer:
    name: str
    type: str
    bottoms: tuple[str, ...]  # ONNX tensor names
    tops: tuple[str, ...]  # ONNX tensor names (unique)
    param: object  # LayerParameter or V1LayerParameter
    blobs: list = field(default_factory=list)  # numpy arrays, in caffemodel order
    blob_tops: tuple[str, ...] = ()  # the Caffe blob name of each top


@dataclass
class NetOutput:
    tensor: str  # ONNX name (= the Caffe blob name)
    layer: str  # the Caffe layer that last wrote it
    index: int  # which top of that layer


@dataclass
class Net:
    name: str
    inputs: list  # [(name, shape tuple)]
    layers: list
    outputs: list
    #: layers whose weights came as double_data (OpenCV cannot read those)
    double_data_layers: tuple = ()


def read_prototxt(path: Path):
    from google.protobuf import text_format

    from retool.converter.caffe.schema import messages

    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    net = messages().NetParameter()
    try:
        # Unknown fields (training-only params such as data_param) are skipped; syntax is still checked.
        text_format.Parse(text, net, allow_unknown_field=True)
    except text_format.ParseError as exc:
        msg = " ".join(str(exc).split())
        m = re.match(r"(\d+):(\d+) : (.*)", msg)
        where = f"line {m.group(1)}, column {m.group(2)}" if m else "an unknown line"
        raise ConversionError(f"{path}: prototxt syntax error at {where}: {m.group(3) if m else msg}; "
                              f"fix the deploy file") from None
    if not net.layer and not net.layers:
        raise ConversionError(f"{path}: no layers found; is this a Caffe deploy .prototxt?")
    return net


def read_caffemodel(path: Path):
    from google.protobuf.message import DecodeError

    from retool.converter.caffe.schema import messages

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    net = messages().NetParameter()
    try:
        net.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ConversionError(f"{path}: not a readable .caffemodel ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]}); the file is truncated or corrupt, "
                              f"download or export it again") from None
    if not net.layer and not net.layers:
        raise ConversionError(f"{path}: holds no layers; is this a binary .caffemodel (and not a prototxt)?")
    return net


def blob_array(blob) -> np.ndarray:
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:  # legacy (num, channels, height, width)
        shape = (blob.num, blob.channels, blob.height, blob.width)
    if len(blob.data):
        arr = np.array(blob.data, dtype=np.float32)
    else:
        arr = np.array(blob.double_data, dtype=np.float64).astype(np.float32)
    if int(np.prod(shape)) != arr.size:
        shape = (arr.size,)  # shape fields missing or inconsistent: keep the data flat
    return arr.reshape(shape)


def _layer_type(layer) -> str:
    if isinstance(layer.type, str):
        return layer.type
    name = layer.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number[layer.type].name
    return V1_TYPES.get(name, name)


def _rule_matches(rule, phase: int = 1) -> bool:
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and rule.min_level > 0:
        return False
    if rule.HasField("max_level") and rule.max_level < 0:
        return False
    return not rule.stage  # a net state with no stages meets no stage rule


def in_test_phase(layer) -> bool:
    if layer.include:
        return any(_rule_matches(r) for r in layer.include)
    return not any(_rule_matches(r) for r in layer.exclude)


def _weights_by_name(model) -> dict:
    out = {}
    for layer in list(model.layers) + list(model.layer):
        if len(layer.blobs):
            out[layer.name] = layer.blobs
    return out


def build_net(proto, model=None, *, path: Path | None = None) -> Net:
    """Flatten ``proto`` (+ weights from ``model``) into layers with unique tensor names."""
    raw = [l for l in (list(proto.layers) + list(proto.layer)) if in_test_phase(l)]
    inputs: list = []
    if proto.input:
        if proto.input_shape:
            shapes = [tuple(int(d) for d in s.dim) for s in proto.input_shape]
        elif proto.input_dim:
            dims = [int(d) for d in proto.input_dim]
            if len(dims) != 4 * len(proto.input):
                raise ConversionError(f"{path}: {len(proto.input)} input(s) but {len(dims)} input_dim values "
                                      f"(need 4 per input)")
            shapes = [tuple(dims[4 * i:4 * i + 4]) for i in range(len(proto.input))]
        else:
            shapes = [()] * len(proto.input)
        if len(shapes) != len(proto.input):
            raise ConversionError(f"{path}: {len(proto.input)} inputs but {len(shapes)} input shapes")
        inputs = list(zip(proto.input, shapes))

    # Count writes per blob so that the last write keeps the plain Caffe name.
    writes: dict[str, int] = {name: 1 for name, _ in inputs}
    for l in raw:
        for t in l.top:
            writes[t] = writes.get(t, 0) + 1
    seen: dict[str, int] = {name: 1 for name, _ in inputs}
    current: dict[str, str] = {name: name for name, _ in inputs}
    weights = _weights_by_name(model) if model is not None else {}
    layers: list[Layer] = []
    consumed: set[str] = set()
    doubles: list[str] = []
    for l in raw:
        ltype = _layer_type(l)
        bottoms = []
        for b in l.bottom:
            if b not in current:
                raise ConversionError(f"{path}: layer {l.name!r} ({ltype}) reads blob {b!r}, which no earlier "
                                      f"layer or input produces")
            bottoms.append(current[b])
            consumed.add(current[b])
        tops = []
        for t in l.top:
            seen[t] = seen.get(t, 0) + 1
            name = t if seen[t] == writes[t] else f"{t}/{l.name}"
            tops.append(name)
            current[t] = name
        if ltype == "Input":
            shapes = [tuple(int(d) for d in s.dim) for s in l.input_param.shape]
            if len(shapes) == 1 and len(l.top) > 1:
                shapes = shapes * len(l.top)
            if len(shapes) != len(l.top):
                raise ConversionError(f"{path}: Input layer {l.name!r} has {len(l.top)} tops but "
                                      f"{len(shapes)} shapes")
            inputs += list(zip(tops, shapes))
            continue
        src_blobs = weights.get(l.name) or l.blobs
        blobs = [blob_array(b) for b in src_blobs]
        if any(len(b.double_data) for b in src_blobs):
            doubles.append(l.name)
        layers.append(Layer(l.name, ltype, tuple(bottoms), tuple(tops), l, blobs, tuple(l.top)))

    input_names = {n for n, _ in inputs}
    outputs = []
    for layer in layers:
        for i, t in enumerate(layer.tops):
            if t not in consumed and t not in input_names and layer.type != "Silence":
                outputs.append(NetOutput(t, layer.name, i))
    if not inputs:
        raise ConversionError(f"{path}: declares no input (input:/input_shape, input_dim or an Input layer)")
    return Net(proto.name, inputs, layers, outputs, tuple(doubles))
