"""Read what an ONNX file declares (inputs, outputs, opset) without loading its weights."""
from __future__ import annotations

import json
from pathlib import Path

from retool.fsutil import load_onnx_header
from retool.types import ModelArtifact, ProvenanceStep, TensorSpec, now_iso

_ELEM = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16",
}


def _value_info_spec(vi) -> TensorSpec:
    t = vi.type.tensor_type
    dims = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorSpec(vi.name, _ELEM.get(t.elem_type, "float32"), tuple(dims))


def io_specs(model) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    inits = {i.name for i in model.graph.initializer}
    ins = tuple(_value_info_spec(v) for v in model.graph.input if v.name not in inits)
    outs = tuple(_value_info_spec(v) for v in model.graph.output)
    return ins, outs


def opset_of(model) -> int | None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return None


def sidecar_report_path(path) -> Path:
    p = Path(path)
    return p.with_name(p.stem + ".report.json")


def artifact_from_onnx(path, precision: str | None = None) -> ModelArtifact:
    """An artifact for an ONNX file; its provenance comes from the sidecar report if it matches."""
    from retool.fsutil import external_data_files, sha256_file

    from retool.input_ranges import ranges_from_graph, with_ranges

    p = Path(path)
    model = load_onnx_header(p)
    ins, outs = io_specs(model)
    ins = with_ranges(ins, ranges_from_graph(model))  # ids that index a table stay inside it
    digest = sha256_file(p)
    provenance: tuple = ()
    target = None
    side = sidecar_report_path(p)
    if side.exists():
        try:
            art = json.loads(side.read_text()).get("artifact") or {}
            if art.get("sha256") == digest:
                prev = ModelArtifact.from_dict(art)
                provenance, target = prev.provenance, prev.target
                precision = precision or prev.precision
                from retool.input_ranges import keep_given

                ins = keep_given(ins, prev.inputs)  # a range the user gave at convert time
        except (ValueError, KeyError):
            pass  # a damaged sidecar only costs us the history
    if not provenance:
        provenance = (ProvenanceStep("ingest", "onnx", {}, {"path": str(p)}, digest, digest, now_iso(), 0.0),)
    return ModelArtifact(p, "onnx", ins, outs, opset_of(model), precision or guess_precision(model), target,
                         digest, provenance, external_data_files(p))


def guess_precision(model) -> str:
    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
              "ConvInteger", "DynamicQuantizeLinear"}:
        return "int8"
    if any(i.data_type == 10 for i in model.graph.initializer):
        return "fp16"
    return "fp32"
