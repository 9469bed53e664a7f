"""Lazy registries: an entry is a dotted ``module:attr`` string, imported on first use.

Adding a converter, target or check is one module plus one line here. Nothing
heavy is imported until a command actually needs that entry, which keeps
``retool --help`` fast and free of torch/tensorflow.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Generic, Iterator, TypeVar

from retool.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self._entries = dict(entries)
        self._loaded: dict[str, Any] = {}

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def register(self, name: str, ref: str) -> None:
        self._entries[name] = ref
        self._loaded.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._entries:
            hint = difflib.get_close_matches(name, self._entries, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise UsageError(f"unknown {self.kind} {name!r}{did_you_mean}; known: {', '.join(self._entries)}")
        if name not in self._loaded:
            module, _, attr = self._entries[name].partition(":")
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self._loaded[name] = obj() if isinstance(obj, type) else obj
        return self._loaded[name]


#: Framework converters. Each module must import its framework lazily.
CONVERTERS: Registry = Registry("framework", {
    "torch": "retool.converter.torch_converter:TorchConverter",
    "onnx": "retool.converter.onnx_passthrough:OnnxConverter",
    "caffe": "retool.converter.caffe.converter:CaffeConverter",
    "tensorflow": "retool.converter.tf_converter:TensorFlowConverter",
    "hf": "retool.converter.hf.converter:HFConverter",
})

#: Optimisation targets (frozen TargetProfile instances in retool.optimizers.targets).
TARGETS: Registry = Registry("target", {
    "cpu": "retool.optimizers.targets:CPU",
    "cpu-int8": "retool.optimizers.targets:CPU_INT8",
    "cpu-int8-dynamic": "retool.optimizers.targets:CPU_INT8_DYNAMIC",
    "arm64-int8": "retool.optimizers.targets:ARM64_INT8",
    "gpu-fp16": "retool.optimizers.targets:GPU_FP16",
    "tensorrt-int8": "retool.optimizers.targets:TENSORRT_INT8",
    "npu-uint8": "retool.optimizers.targets:NPU_UINT8",
    "cpu-auto": "retool.optimizers.targets:CPU_AUTO",
    "cpu-int4": "retool.optimizers.targets:CPU_INT4",
    "cpu-int8-weight": "retool.optimizers.targets:CPU_INT8_WEIGHT",
})
