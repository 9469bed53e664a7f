"""The numeric precision a source model computes in, so that parity is judged by the right tolerances.

A quantized source (TorchScript or an eager module with ``quantized::`` ops, from torch.ao.quantization;
a TensorFlow graph with fake-quant ops, from Keras quantization-aware training) rounds at every layer in
its own kernels; the ONNX copy rounds with onnxruntime's. Their outputs agree as well as two int8
implementations do, not to fp32 precision, so parity uses the int8 tolerances.
"""
from __future__ import annotations

#: ops of a quantized TorchScript graph that mark the source as int8
_QUANT_OPS = ("aten::quantize_per_tensor", "aten::quantize_per_channel", "aten::dequantize")


def _graph_kinds(graph) -> set[str]:
    kinds: set[str] = set()
    stack = list(graph.nodes())
    while stack:
        n = stack.pop()
        kinds.add(n.kind())
        for b in n.blocks():
            stack.extend(b.nodes())
    return kinds


def torch_precision(torch, module) -> tuple[str, str]:
    """("int8", why) for a quantized torch module, else ("fp32", "")."""
    if module is None:
        return "fp32", ""
    if isinstance(module, torch.jit.ScriptModule):
        try:
            kinds = _graph_kinds(module.inlined_graph)
        except Exception:  # a graph we cannot read is judged as fp32
            return "fp32", ""
        quant = sorted(k for k in kinds if k.startswith("quantized::"))
        if quant:
            more = f" and {len(quant) - 3} more" if len(quant) > 3 else ""
            return "int8", f"the TorchScript graph computes with quantized ops ({', '.join(quant[:3])}{more})"
        if any(k in kinds for k in _QUANT_OPS[:2]):
            return "int8", "the TorchScript graph quantizes its activations (aten::quantize_per_tensor)"
        return "fp32", ""
    if not isinstance(module, torch.nn.Module):
        return "fp32", ""
    quant = sorted({type(m).__module__.rsplit(".", 1)[0] + "." + type(m).__name__ for m in module.modules()
                    if ".quantized" in type(m).__module__ and not type(m).__name__.startswith(("DeQuantize",))})
    if quant:
        return "int8", f"the module holds quantized layers ({', '.join(sorted(quant)[:3])})"
    return "fp32", ""


#: TensorFlow ops that round to an integer grid in the graph: what TFMOT's QAT layers become
_TF_QUANT_OPS = ("FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxVarsPerChannel", "FakeQuantWithMinMaxArgs",
                 "QuantizeAndDequantizeV2", "QuantizeAndDequantizeV3", "QuantizeAndDequantizeV4")


def graph_def_precision(graph_def) -> tuple[str, str]:
    """("int8", why) for a TensorFlow GraphDef (with its function library) that fake-quantizes, else fp32."""
    ops = {n.op for n in graph_def.node} | {n.op for f in graph_def.library.function for n in f.node_def}
    found = sorted(o for o in ops if o in _TF_QUANT_OPS)
    if not found:
        return "fp32", ""
    return "int8", f"the TensorFlow graph fake-quantizes ({', '.join(found)}: quantization-aware training)"


def source_precision(model) -> tuple[str, str]:
    """(precision, why) of a loaded SourceModel; fp32 unless the source says otherwise."""
    own = getattr(model, "source_precision", None)
    if callable(own):
        return own()
    module = getattr(model, "module", None)
    torch = getattr(model, "torch", None)
    if torch is not None and module is not None and getattr(model, "framework", "") == "torch":
        return torch_precision(torch, module)
    return "fp32", ""
