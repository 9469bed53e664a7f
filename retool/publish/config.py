"""Triton ``config.pbtxt`` for an ONNX artifact (platform onnxruntime_onnx).

Written as protobuf text by hand so publishing needs no Triton package; the tests
parse every config with Triton's own schema (``tritonclient``'s model_config_pb2),
and ``retool repo verify`` does too when tritonclient is installed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

TRITON_DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16",
    "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64",
    "bool": "TYPE_BOOL", "string": "TYPE_STRING",
}
DEFAULT_MAX_BATCH = 8


def _q(text) -> str:
    """A protobuf text-format string literal (UTF-8 kept as is)."""
    return json.dumps(str(text), ensure_ascii=False)


@dataclass(frozen=True)
class ServingProfile:
    """How Triton should run an artifact built for a target."""

    kind: str  # KIND_CPU | KIND_GPU | KIND_AUTO
    #: (accelerator name, parameters) for optimization.execution_accelerators.gpu_execution_accelerator
    gpu_accelerator: tuple[str, tuple[tuple[str, str], ...]] | None = None
    note: str = ""


_TRT_WORKSPACE = ("max_workspace_size_bytes", "1073741824")
PROFILES: dict[str, ServingProfile] = {
    "tensorrt-int8": ServingProfile("KIND_GPU", ("tensorrt", (("precision_mode", "INT8"), _TRT_WORKSPACE)),
                                    "TensorRT builds int8 engines from the QDQ nodes; no calibration table needed"),
    "gpu-fp16": ServingProfile("KIND_GPU", ("tensorrt", (("precision_mode", "FP16"), _TRT_WORKSPACE)),
                               "fp16 weights; TensorRT in fp16, CUDA for what TensorRT does not take"),
    "cpu": ServingProfile("KIND_CPU"),
    "cpu-int8": ServingProfile("KIND_CPU"),
    "cpu-int8-dynamic": ServingProfile("KIND_CPU"),
    "cpu-auto": ServingProfile("KIND_CPU"),
    "arm64-int8": ServingProfile("KIND_CPU"),
    "cpu-int4": ServingProfile("KIND_CPU"),
    "cpu-int8-weight": ServingProfile("KIND_CPU"),
    "npu-uint8": ServingProfile("KIND_CPU", note="Triton has no NPU kind; serve on CPU or hand the file to the NPU SDK"),
}


def profile_for(target: str | None) -> ServingProfile:
    if not target:
        return ServingProfile("KIND_AUTO", note="no target recorded: Triton picks GPU when present")
    if target in PROFILES:
        return PROFILES[target]
    if target.startswith(("gpu", "cuda", "tensorrt")):
        return ServingProfile("KIND_GPU", note=f"unknown GPU target {target!r}: no accelerator settings")
    return ServingProfile("KIND_AUTO", note=f"unknown target {target!r}: Triton picks the device")


def batchable(inputs: Sequence[Mapping], outputs: Sequence[Mapping]) -> bool:
    """Triton batching needs a leading dynamic axis on every input *and* output."""
    tensors = list(inputs) + list(outputs)
    return bool(inputs) and all(t.get("shape") and not isinstance(t["shape"][0], int) for t in tensors)


def _dims(shape: Iterable) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def _tensor(t: Mapping, drop_batch: bool) -> str:
    dtype = TRITON_DTYPES.get(t.get("dtype", "float32"))
    if dtype is None:
        from retool.errors import PublishError

        raise PublishError(f"tensor {t['name']!r} has dtype {t.get('dtype')!r}, which Triton cannot serve")
    dims = _dims(list(t.get("shape", ()))[1:] if drop_batch else t.get("shape", ()))
    lines = [f"    name: {_q(t['name'])}", f"    data_type: {dtype}"]
    if dims:
        lines.append(f"    dims: [ {', '.join(map(str, dims))} ]")
    else:  # Triton wants at least one dim: a scalar is [1] reshaped to []
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    return "  {\n" + "\n".join(lines) + "\n  }"


def version_policy_text(served: Sequence[int] | None) -> str:
    if served:
        return f"version_policy: {{ specific: {{ versions: [ {', '.join(str(v) for v in sorted(set(served)))} ] }} }}"
    return "version_policy: { latest: { num_versions: 1 } }"


def build_config(name: str, artifact: Mapping, *, served_versions: Sequence[int] | None = None,
                 max_batch_size: int | None = None, instance_count: int = 1,
                 dynamic_batching: Mapping | bool = True, parameters: Mapping[str, object] | None = None) -> str:
    """config.pbtxt text for ``artifact`` (a ModelArtifact.to_dict()-shaped mapping).

    ``dynamic_batching``: True (the default queue delay), False (off), or a mapping with
    max_queue_delay_microseconds / preferred_batch_size (a serving profile's choice).
    ``parameters``: backend parameters such as intra_op_thread_count (strings in the config).
    """
    inputs, outputs = artifact.get("inputs", ()), artifact.get("outputs", ())
    # A decoder's requests differ in sequence and past length, so Triton cannot batch them:
    # the batch axis stays in dims as -1 (max_batch_size 0) and the client sends the cache.
    decoder = any(str(t.get("name", "")).startswith("past_key_values.") for t in inputs)
    batch = not decoder and batchable(inputs, outputs) and (max_batch_size is None or max_batch_size > 0)
    mbs = (max_batch_size or DEFAULT_MAX_BATCH) if batch else 0
    prof = profile_for(artifact.get("target"))
    out = [
        f"# Generated by retool; target {artifact.get('target') or 'none'}, precision {artifact.get('precision')}."
        + (f" {prof.note}." if prof.note else ""),
        f"name: {_q(name)}",
        'platform: "onnxruntime_onnx"',
        'default_model_filename: "model.onnx"',
        f"max_batch_size: {mbs}",
        version_policy_text(served_versions),
        "input [\n" + ",\n".join(_tensor(t, batch) for t in inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor(t, batch) for t in outputs) + "\n]",
    ]
    if batch and mbs > 1 and dynamic_batching is not False:
        db = dynamic_batching if isinstance(dynamic_batching, Mapping) else {}
        parts = [f"max_queue_delay_microseconds: {int(db.get('max_queue_delay_microseconds', 100))}"]
        pref = [int(b) for b in db.get("preferred_batch_size") or () if 0 < int(b) <= mbs]
        if pref:
            parts.append(f"preferred_batch_size: [ {', '.join(map(str, pref))} ]")
        out.append("dynamic_batching { " + " ".join(parts) + " }")
    out.append(f"instance_group [ {{ count: {int(instance_count)} kind: {prof.kind} }} ]")
    for k, v in sorted((parameters or {}).items()):
        out.append(f"parameters {{ key: {_q(k)} value: {{ string_value: {_q(v)} }} }}")
    if prof.gpu_accelerator:
        acc, params = prof.gpu_accelerator
        ps = "\n".join(f"        parameters {{ key: {_q(k)} value: {_q(v)} }}" for k, v in params)
        out.append("optimization { execution_accelerators {\n"
                   f"    gpu_execution_accelerator: [ {{\n        name: {_q(acc)}\n{ps}\n    }} ]\n}}}}")
    return "\n".join(out) + "\n"


def parse_with_triton_schema(text: str):
    """Parse with Triton's ModelConfig schema; None when tritonclient is not installed."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return None
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def config_json(text: str) -> dict:
    """A config.pbtxt as JSON (Triton's schema), the form retool.serve.tune.from_config reads."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    return json_format.MessageToDict(text_format.Parse(text, model_config_pb2.ModelConfig()),
                                     preserving_proto_field_name=True)
