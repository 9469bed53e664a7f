"""The transformer path: recognise an encoder, fuse it with ORT's transformer optimizer, pick the faster base.

``onnxruntime.transformers.optimizer`` fuses Attention, SkipLayerNormalization,
BiasGelu and EmbedLayerNormalization where it finds their patterns. Which ones it
finds depends on the exporter: ORT does not match the torch dynamo exporter's attention,
so optimizers.attention_rewrite turns it into com.microsoft.Attention first (dynamic int8
then makes QAttention of it). The fused model is a candidate base for dynamic int8, never
assumed better: both bases are quantized and measured.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

#: What the fusions produce (counted in the report).
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu",
             "FastGelu", "Gelu", "LayerNormalization", "SkipSimplifiedLayerNormalization")
#: What dynamic int8 makes of them (the fused int8 build's counts in the report).
QUANT_OPS = FUSED_OPS + ("QAttention", "MatMulInteger", "DynamicQuantizeMatMul", "Softmax")


@dataclass(frozen=True)
class Encoder:
    kind: str  # text | vision
    model_type: str  # the ORT optimizer's model_type: bert (BERT/RoBERTa/DistilBERT-like) | vit
    layers: int  # attention blocks seen (Softmax count)
    why: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "model_type": self.model_type, "layers": self.layers, "why": self.why}


def detect_encoder(path) -> Encoder | None:
    """A BERT/RoBERTa/DistilBERT-like text encoder or a ViT-like vision encoder, from the graph's ops."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in m.graph.node)
    softmax = ops.get("Softmax", 0)
    norms = ops.get("LayerNormalization", 0) + ops.get("SkipLayerNormalization", 0) + ops.get("ReduceMean", 0)
    matmuls = ops.get("MatMul", 0) + ops.get("Gemm", 0) + ops.get("Attention", 0)
    if ops.get("Attention", 0) or ops.get("MultiHeadAttention", 0):
        softmax = max(softmax, ops.get("Attention", 0) + ops.get("MultiHeadAttention", 0))
    if softmax < 1 or norms < 2 or matmuls < 4:
        return None
    inits = {i.name: i for i in m.graph.initializer}
    graph_inputs = {i.name: i.type.tensor_type.elem_type for i in m.graph.input if i.name not in inits}
    int_inputs = [n for n, t in graph_inputs.items() if t in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)]
    table = any(n.op_type == "Gather" and n.input and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
                for n in m.graph.node)
    if int_inputs and table:
        return Encoder("text", "bert", softmax, f"token-id input(s) {', '.join(int_inputs)}, an embedding table, "
                       f"{softmax} softmax attention block(s) and layer norms")
    conv4d = any(len(i.type.tensor_type.shape.dim) == 4 for i in m.graph.input if i.name not in inits)
    if conv4d and ops.get("Conv", 0) >= 1 and ops.get("Conv", 0) <= 2:
        return Encoder("vision", "vit", softmax, f"a patch-embedding convolution, {softmax} softmax attention "
                       f"block(s) and layer norms")
    return None


def fuse(src, dst, encoder: Encoder, notes: dict | None = None) -> dict:
    """Write ORT's transformer fusions of ``src`` to ``dst``; returns what was fused.

    The torch dynamo exporter's attention is first rewritten into com.microsoft.Attention
    (optimizers.attention_rewrite: each block proven on padded inputs), since ORT's attention
    fusion does not match it; ``notes`` gets what that pass rewrote and skipped."""
    import contextlib
    import io
    import logging
    from pathlib import Path

    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    from retool.optimizers.attention_rewrite import rewrite

    dst = Path(dst)
    res = rewrite(onnx.load(str(src)))
    if notes is not None:
        notes.update(res.to_dict())
    if res.rewritten:
        src = dst.with_name(dst.stem + ".attention.onnx")
        onnx.save(res.model, str(src))
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the optimizer prints its statistics
            # num_heads/hidden_size 0: read from the graph; opt_level 0: python fusions only, so the
            # saved file stays portable (ORT's own passes run again at load time)
            om = optimize_model(str(src), model_type=encoder.model_type, num_heads=0, hidden_size=0, opt_level=0,
                                use_gpu=False)
    except Exception as exc:  # its fusions assume the TorchScript exporter's graphs; the rewrite still stands
        if not res.rewritten:
            raise
        from retool.errors import first_line

        if notes is not None:
            notes["onnxruntime_optimizer"] = f"failed ({first_line(exc, limit=200)}); attention rewrite only"
        onnx.save(res.model, str(dst))
        return {"Attention": len(res.rewritten)}
    stats = {k: v for k, v in (om.get_fused_operator_statistics() or {}).items() if v}
    om.save_model_to_file(str(dst), use_external_data_format=False)
    return stats


def op_counts(path, ops=FUSED_OPS) -> dict[str, int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    c = Counter(n.op_type for n in m.graph.node)
    return {k: c[k] for k in ops if c.get(k)}


def expand_skip_layer_norm(src, dst) -> int:
    """Write ``src`` with each SkipLayerNormalization as Sum + LayerNormalization; returns how many.

    ORT 1.32's CPU SkipLayerNormalization kernel measured about 4x slower than Add + LayerNormalization
    (hidden 256, seq 128, Intel AMX machine); Sum is used because ORT's load-time SkipLayerNormFusion
    matches Add + LayerNormalization and would fuse it back."""
    import onnx
    from onnx import helper

    m = onnx.load(str(src))
    read = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    nodes, count = [], 0
    for n in m.graph.node:
        ins = list(n.input) + [""] * (5 - len(n.input))
        if n.op_type != "SkipLayerNormalization" or any(o in read for o in list(n.output)[1:] if o):
            nodes.append(n)
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-12)
        total = n.output[0] + ".sum"
        nodes.append(helper.make_node("Sum", [i for i in (ins[0], ins[1], ins[4]) if i], [total], name=n.name + ".sum"))
        nodes.append(helper.make_node("LayerNormalization", [total, ins[2]] + ([ins[3]] if ins[3] else []),
                                      [n.output[0]], name=n.name + ".ln", axis=-1, epsilon=eps))
        count += 1
    m.graph.ClearField("node")
    m.graph.node.extend(nodes)
    onnx.save(m, str(dst))
    return count


#: The bases dynamic int8 is built on, simplest first (a tie keeps the earlier one).
BASES = ("unfused", "fused", "fused-layernorm")


def build_dynamic(profile, ctx, tol, build_candidate):
    """Dynamic int8 of an encoder on three bases: unfused, fused, and fused with SkipLayerNormalization
    expanded; the fastest one that passes is kept (retool.speed's rule).

    Weights are quantized per channel here: on a 4-layer BERT (hidden 256) that took the pooled cosine
    from 0.99988 to 0.99991 at no measurable cost in speed.
    Returns the Candidate, with ``extra["transformer"]`` saying what was fused and what each base measured."""
    import dataclasses

    from retool import console
    from retool.optimizers import latency
    from retool.optimizers.quantize import preprocess

    enc = ctx.encoder
    profile = dataclasses.replace(profile, per_channel=True)
    info: dict = {"encoder": enc.to_dict(), "variants": {}, "per_channel": True}
    unfused = build_candidate(profile, ctx, tol, base=ctx.preprocessed(), tag="")
    cands = {"unfused": unfused}
    fused_fp32 = ctx.workdir / "fused.fp32.onnx"
    try:
        with console.step(f"transformer fusions (attention rewrite, onnxruntime.transformers "
                          f"model_type={enc.model_type})"):
            rewrite_notes: dict = {}
            stats = fuse(ctx.src, fused_fp32, enc, rewrite_notes)
        info["fusions"] = stats
        info["attention_rewrite"] = rewrite_notes
        ok, checks = ctx.evaluate(fused_fp32, ctx.fp32_tolerance)
        info["fused_fp32_parity"] = {c.name: {k: (c.details or {}).get(k) for k in ("cosine", "max_abs")}
                                     for c in checks}
        if not stats:
            info["fused"] = "nothing to fuse in this graph"
        elif not ok:
            info["fused"] = "fusion changed the fp32 outputs beyond the fp32 tolerance; not used"
        else:
            bases = {"fused": fused_fp32}
            expanded = ctx.workdir / "fused-layernorm.fp32.onnx"
            if expand_skip_layer_norm(fused_fp32, expanded):
                bases["fused-layernorm"] = expanded
            info["fused_int8"] = {}
            for key, fp32 in bases.items():
                pre = ctx.workdir / f"{key}.pre.onnx"
                warns = preprocess(fp32, pre)
                cand = build_candidate(profile, ctx, tol, base=pre, tag=key)
                cand.warnings.extend(w for w in warns if w not in cand.warnings)
                cand.tools.insert(0, f"onnxruntime.transformers.optimizer(model_type={enc.model_type})")
                if rewrite_notes.get("attention_blocks"):
                    cand.tools.insert(0, "retool attention rewrite (com.microsoft.Attention)")
                if key == "fused-layernorm":
                    cand.tools.append("SkipLayerNormalization expanded to Sum + LayerNormalization")
                info["fused_int8"][key] = {"passed": cand.passed, "ops": op_counts(cand.path, QUANT_OPS),
                                           "kept_float": list(cand.excluded)}
                cands[key] = cand
    except Exception as exc:  # fusion is an optimisation: the unfused base still stands
        from retool.errors import first_line

        info["fused"] = f"fusion failed ({first_line(exc, limit=200)})"
    passing = {k: c for k, c in cands.items() if c.passed}
    chosen_key = "unfused"
    if len(passing) > 1 and ctx.measure:
        from retool import speed

        with console.step(f"measuring dynamic int8 on {', '.join(passing)} against fp32"):
            lat, samples = latency.measure({"fp32": ctx.src, **{k: c.path for k, c in passing.items()}},
                                           ctx.heldout[0], threads=ctx.threads, with_samples=True)
        for k in passing:
            info["variants"][k] = lat["variants"][k]
        # the one rule: a fused base only when decidedly faster in paired rounds; a tie keeps the simpler graph
        choice = speed.choose_fastest(latency.judged(samples, lat["threads"]), list(BASES))
        chosen_key = choice.name
        info["decision"] = choice.to_dict()
        info["fp32_p50_ms"] = lat["variants"]["fp32"]["p50_ms"]
    elif passing:
        chosen_key = next(iter(passing))
    info["chosen"] = chosen_key
    chosen = cands[chosen_key]
    chosen.extra["transformer"] = info
    if chosen_key != "unfused":
        chosen.extra["transformer"]["fused_ops"] = op_counts(chosen.path)
    return chosen
