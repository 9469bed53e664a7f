"""Why an accuracy goal is out of int8's reach: the goal's metrics with only the weights in int8 and
with only the activations in 8 bits, taken apart from the plain QDQ model the search started from.

A QDQ model holds both errors: weights stored as int8 behind a DequantizeLinear, and every activation
passed through a QuantizeLinear/DequantizeLinear pair. Replacing each activation pair by its float
input (through a Relu where the pair clipped at zero: onnxruntime folds a Relu into the pair's range)
keeps onnxruntime's own rounded weights with float activations; replacing each weight's
DequantizeLinear by the float weight keeps onnxruntime's own activation quantization with float
weights. When either half alone already misses the goal on the held-out rows, no build that leaves
that half in int8 everywhere can meet it, and the search's miss is the model's, not the search's
(measured on the ResNet-18-like anchor: see docs/optimize.md).
"""
from __future__ import annotations

from pathlib import Path

from retool import console

#: onnxruntime's suffix for a quantized initializer (quant_utils.TENSOR_NAME_QUANT_SUFFIX)
QUANT_SUFFIX = "_quantized"


def split(qdq_path: Path, float_path: Path, weights_out: Path, activations_out: Path,
          external: bool = False) -> dict:
    """Write the weights-only and the activations-only models of ``qdq_path``; returns what was kept."""
    import onnx
    from onnx import helper, numpy_helper

    floats = {t.name: t for t in onnx.load(str(float_path)).graph.initializer}
    counts = {}
    for kind, out in (("weights", weights_out), ("activations", activations_out)):
        m = onnx.load(str(qdq_path))
        g = m.graph
        inits = {t.name: t for t in g.initializer}
        made = {n.output[0]: n for n in g.node}
        nodes, changed, added = [], 0, []
        for n in g.node:
            if n.op_type != "DequantizeLinear":
                nodes.append(n)
                continue
            src = n.input[0]
            q = made.get(src)
            if kind == "weights" and q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in inits:
                # onnxruntime drops a Relu whose range the pair's zero point already clips: keep that clip
                op = "Relu" if _floor_at_zero(q, inits) else "Identity"
                nodes.append(helper.make_node(op, [q.input[0]], [n.output[0]], name=n.name))
                changed += 1
            elif kind == "activations" and src in inits:
                orig = src[:-len(QUANT_SUFFIX)] if src.endswith(QUANT_SUFFIX) else None
                if orig in floats:  # the float weight the quantizer started from
                    t = numpy_helper.from_array(numpy_helper.to_array(floats[orig]), f"{n.output[0]}_float")
                    added.append(t)
                    nodes.append(helper.make_node("Identity", [t.name], [n.output[0]], name=n.name))
                    changed += 1
                else:
                    nodes.append(n)
            else:
                nodes.append(n)
        del g.node[:]
        g.node.extend(_live(nodes, [o.name for o in g.output]))
        g.initializer.extend(added)
        used = {i for n in g.node for i in n.input}
        keep = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
        onnx.save(m, str(out), save_as_external_data=external, location=f"{Path(out).name}.data" if external else None)
        counts[kind] = changed
    return counts


def _floor_at_zero(q, inits) -> bool:
    """The QuantizeLinear's zero point is its type's lowest value: everything below 0 saturates to 0."""
    import numpy as np
    from onnx import numpy_helper

    if len(q.input) < 3 or q.input[2] not in inits:
        return True  # no zero point: uint8 with zero point 0
    zp = numpy_helper.to_array(inits[q.input[2]])
    return zp.size == 1 and int(zp.reshape(-1)[0]) == int(np.iinfo(zp.dtype).min)


def _live(nodes: list, outputs: list[str]) -> list:
    """``nodes`` without those whose outputs nothing reads (the QuantizeLinear left behind), in order."""
    need = set(outputs)
    keep = []
    for n in reversed(nodes):
        if any(o in need for o in n.output):
            keep.append(n)
            need.update(i for i in n.input if i)
    return keep[::-1]


def measure(qdq_path: Path, float_path: Path, evaluate, workdir: Path, goal, external: bool = False) -> dict | None:
    """The goal's metrics for each half alone (``evaluate``: path -> (passed, checks), the held-out
    check the search used); None when the model has no QDQ pairs to take apart."""
    from retool.optimizers.report import worst_metrics

    w, a = Path(workdir) / "bound-weights.onnx", Path(workdir) / "bound-activations.onnx"
    try:
        counts = split(qdq_path, float_path, w, a, external)
        if not counts["weights"] or not counts["activations"]:
            return None
        out = {}
        for kind, path in (("weights_int8_only", w), ("activations_int8_only", a)):
            passed, checks = evaluate(path)
            out[kind] = {"meets_goal": bool(passed), **worst_metrics(checks)}
    finally:
        for p in (w, a):
            for f in (p, p.with_name(p.name + ".data")):
                f.unlink(missing_ok=True)
    out["goal"] = str(goal)
    out["finding"] = finding(out, goal)
    return out


def _reached(m: dict) -> str:
    if "top1" in m:
        return f"top1 {m['top1']:.3f}" + (f" (bound {m['top1_lower']:.3f})" if "top1_lower" in m else "")
    return f"cos {m['cosine_min_row' if 'cosine_min_row' in m else 'cosine']:.6g}" if "cosine" in m else "?"


def finding(bound: dict, goal) -> str:
    w, a = bound["weights_int8_only"], bound["activations_int8_only"]
    said = (f"int8 weights with float activations reach {_reached(w)}; 8-bit activations with float "
            f"weights reach {_reached(a)}")
    missed = [x for x, m in (("int8 weights", w), ("8-bit activations", a)) if not m["meets_goal"]]
    if missed:
        return (f"{said}: {' and '.join(missed)} alone already miss {goal}, so no build that quantizes every "
                f"layer can meet it: only layers kept in float (--accuracy-budget), fp16/fp32 or "
                f"quantization-aware training")
    return f"{said}: each half alone meets {goal}, together they do not (keeping layers in float is the way)"


def log(bound: dict | None, label: str) -> None:
    if bound:
        console.info(f"  {label}why: {bound['finding']}")
