"""The graph a Caffe net lowers into: ONNX nodes and initializers with each tensor's Caffe shape, and the
registry of per-layer-type handlers (``HANDLERS``, filled by ``@handles`` in layers.py and detection.py)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from retool.converter.caffe.reader import Layer
from retool.errors import ConversionError


class Builder:
    """Collects ONNX nodes and initializers; tracks each tensor's Caffe shape."""

    def __init__(self, opset: int, weights_label: str = "the weights file"):
        self.opset = opset
        self.weights_label = weights_label
        self.nodes: list = []
        self.initializers: list = []
        self.shapes: dict[str, tuple] = {}
        #: whether axis 0 of a tensor is the (possibly dynamic) batch axis
        self.batched: dict[str, bool] = {}
        self._used: set[str] = set()

    def fresh(self, hint: str) -> str:
        name, i = hint, 0
        while name in self._used or name in self.shapes:
            i += 1
            name = f"{hint}_{i}"
        self._used.add(name)
        return name

    def const(self, hint: str, value, dtype=np.float32) -> str:
        from onnx import numpy_helper

        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(value, dtype=dtype)), name))
        return name

    def ints(self, hint: str, values) -> str:
        return self.const(hint, np.asarray(list(values), dtype=np.int64), np.int64)

    def op(self, op_type: str, inputs, outputs=None, hint: str = "", **attrs):
        from onnx import helper

        if outputs is None:
            outputs = [self.fresh(f"{hint or op_type}_out")]
        elif isinstance(outputs, str):
            outputs = [outputs]
        for o in outputs:
            self._used.add(o)
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs),
                                           name=self.fresh(f"{hint or op_type}"), **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def shape(self, tensor: str) -> tuple:
        return self.shapes[tensor]

    def set(self, tensor: str, shape, batched: bool = True) -> None:
        self.shapes[tensor] = tuple(int(d) for d in shape)
        self.batched[tensor] = batched

    def blob(self, L: Layer, i: int, shape, label: str) -> np.ndarray:
        shape = tuple(int(d) for d in shape)
        if i >= len(L.blobs):
            raise ConversionError(
                f"layer {L.name!r} ({L.type}) needs blob {i} ({label}, shape {shape}) but {self.weights_label} "
                f"has {len(L.blobs)} blob(s) for it; the .caffemodel does not match the prototxt")
        arr = L.blobs[i]
        squeeze = lambda s: tuple(d for d in s if d != 1)  # noqa: E731  legacy 4-D dims pad with 1s
        if arr.size != int(np.prod(shape)) or squeeze(arr.shape) != squeeze(shape):
            raise ConversionError(
                f"layer {L.name!r} ({L.type}): blob {i} ({label}) in {self.weights_label} has shape "
                f"{tuple(arr.shape)} but the prototxt needs {shape}; the .caffemodel does not match the prototxt")
        return arr.reshape(shape).astype(np.float32, copy=False)

    def reduce(self, op_type: str, x: str, axes, hint: str, keepdims: int = 1) -> str:
        if self.opset >= 18:
            return self.op(op_type, [x, self.ints(f"{hint}_axes", axes)], hint=hint, keepdims=keepdims)
        return self.op(op_type, [x], hint=hint, axes=list(axes), keepdims=keepdims)


Handler = Callable[[Builder, Layer], None]
HANDLERS: dict[str, Handler] = {}


def handles(*types: str):
    def deco(fn):
        for t in types:
            HANDLERS[t] = fn
        return fn
    return deco


def unsupported(L: Layer, what: str) -> ConversionError:
    return ConversionError(f"layer {L.name!r} ({L.type}): {what} is not supported")


def bcast(arr: np.ndarray, trailing: int) -> np.ndarray:
    return arr.reshape(arr.shape + (1,) * trailing)


def same(b: Builder, L: Layer, out: str, src: str) -> None:
    b.set(out, b.shape(src), b.batched[src])
