"""Rewrite an exported decoder (torch.onnx dynamo) toward onnxruntime's fused CPU contrib ops.

On CPU with small models the per-node overhead dominates a decode step, so fewer, fused nodes are the lever:
- RMSNorm -> ``SkipSimplifiedLayerNormalization`` (onnxruntime's own transformer-optimizer passes; the first
  norm, with no residual, as x + x, see ``_ms_domain_norms``);
- MatMuls sharing one input with constant weights (Q/K/V, gate/up) -> one MatMul on the concatenated
  weights and a Split, so weight-only int4 later gets one bigger matrix;
- per layer, rotary embedding -> ``com.microsoft.RotaryEmbedding`` fed the graph's ``position_ids`` (so
  left-padded rows keep their own positions), and attention with its KV-cache concat ->
  ``com.microsoft.GroupQueryAttention`` (rotary off inside it).

The I/O contract is unchanged: ``past_key_values.*`` in, ``present.*`` out (BNSH, past + new), a left-padded
``attention_mask``. GroupQueryAttention on CPU takes per-row lengths (``seqlens_k``) that assume right
padding, so every row is given the full length and the padding goes in as an additive ``attention_bias``
built once from ``attention_mask`` (causality stays inside the op). Limits of the op, documented in
onnxruntime's ContribOperators.md: a step of more than one token with a non-empty past needs batch 1; the
cosine/sine caches cover ``max_positions`` positions.

Anything that does not match the expected pattern (sliding windows, soft-capping, QK-norm, partial rotary,
fused rotary-less attention such as GPT-2's) is left as exported and the reason is returned.
"""
from __future__ import annotations

import numpy as np

from retool.optimizers.graph_rewrite import (Graph, Unfusable, attr, last_dims, op_counts, prune, ranks,
                                             replace_nodes, sort_graph, toposort)

#: additive bias of a padded key: float32's lowest, as transformers' masks use (finite: no NaN in softmax)
MASKED = float(np.finfo(np.float32).min)
MS = "com.microsoft"


def _op(g: Graph, tensor, op):
    n = g.prod.get(tensor)
    if n is None or n.op_type != op:
        raise Unfusable(f"{tensor}: expected {op}, found {n.op_type if n is not None else 'a graph input'}")
    return n


# -- sibling MatMuls ---------------------------------------------------------------------------------------
def merge_sibling_matmuls(g: Graph) -> int:
    """MatMul(x, W1..Wn) with constant 2-D weights (and each an Add of a constant bias, or none) ->
    MatMul(x, [W1..Wn]) (+ Add) + Split; returns how many groups were merged."""
    import onnx

    merged, done = 0, set()
    while True:
        groups: dict[str, list] = {}
        for n in g.g.node:
            if n.op_type == "MatMul" and n.input[1] in g.inits and len(g.inits[n.input[1]].dims) == 2:
                groups.setdefault(n.input[0], []).append(n)
        x, mms = next(((x, m) for x, m in groups.items() if x not in done and len(m) >= 2), (None, None))
        if x is None:
            return merged
        done.add(x)
        if len({g.inits[m.input[1]].dims[0] for m in mms}) != 1:
            continue
        ws = [g.const(m.input[1]) for m in mms]
        if len({w.dtype for w in ws}) != 1:
            continue
        biases = []
        for m in mms:
            c = g.cons.get(m.output[0], [])
            b = None
            if len(c) == 1 and c[0].op_type == "Add":
                other = c[0].input[1] if c[0].input[0] == m.output[0] else c[0].input[0]
                b = g.const(other)
                b = b if b is not None and b.shape == (g.inits[m.input[1]].dims[1],) else None
            biases.append((c[0] if b is not None else None, b))
        with_bias = all(b is not None for _, b in biases)
        sizes = [w.shape[1] for w in ws]
        tag = f"{mms[0].name or mms[0].output[0]}__fused{len(mms)}"
        wname = g.add_init(f"{tag}_weight", np.concatenate(ws, axis=1))
        new = [onnx.helper.make_node("MatMul", [x, wname], [f"{tag}_mm"], name=f"{tag}_MatMul")]
        out = f"{tag}_mm"
        if with_bias:
            bname = g.add_init(f"{tag}_bias", np.concatenate([b for _, b in biases]).astype(ws[0].dtype))
            new.append(onnx.helper.make_node("Add", [out, bname], [f"{tag}_add"], name=f"{tag}_Add"))
            out = f"{tag}_add"
            outs = [a.output[0] for a, _ in biases]
            drop = {m.output[0] for m in mms} | {a.output[0] for a, _ in biases}
        else:
            outs = [m.output[0] for m in mms]
            drop = {m.output[0] for m in mms}
        split = g.add_init(f"{tag}_split", np.array(sizes, np.int64))
        new.append(onnx.helper.make_node("Split", [out, split], outs, name=f"{tag}_Split", axis=-1))
        replace_nodes(g, drop, new)
        merged += 1


# -- attention ---------------------------------------------------------------------------------------------
def _unhead(g: Graph, t):
    """x3d from Transpose(Reshape(x3d, (B, S, N, D)), perm 0,2,1,3)."""
    tr = _op(g, t, "Transpose")
    if list(attr(tr, "perm", [])) != [0, 2, 1, 3]:
        raise Unfusable(f"{t}: a Transpose that is not BSND -> BNSD")
    return _op(g, tr.input[0], "Reshape").input[0]


def _slice_range(g: Graph, node):
    starts, ends = g.const(node.input[1]), g.const(node.input[2])
    axes = g.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if starts is None or ends is None or starts.size != 1 or (axes is not None and int(axes.ravel()[0]) not in (-1, 3)):
        raise Unfusable(f"{node.name}: a Slice that is not on the last axis")
    return int(starts.ravel()[0]), int(ends.ravel()[0])


def _rotary(g: Graph, t, head_dim: int):
    """(x, cos, sin) of t = x * cos + rotate_half(x) * sin (transformers' non-interleaved RoPE on the full head)."""
    add = _op(g, t, "Add")
    muls = [g.prod.get(i) for i in add.input]
    if any(m is None or m.op_type != "Mul" for m in muls):
        raise Unfusable(f"{t}: not x*cos + rotate_half(x)*sin")
    rot = next((m for m in muls if any(g.prod.get(i) is not None and g.prod[i].op_type == "Concat" for i in m.input)),
               None)
    if rot is None:
        raise Unfusable(f"{t}: no rotate_half")
    plain = muls[1] if rot is muls[0] else muls[0]
    cat_in = next(i for i in rot.input if g.prod.get(i) is not None and g.prod[i].op_type == "Concat")
    sin = rot.input[1] if rot.input[0] == cat_in else rot.input[0]
    cat = g.prod[cat_in]
    if len(cat.input) != 2 or attr(cat, "axis") not in (-1, 3):
        raise Unfusable(f"{t}: rotate_half is not a 2-way Concat on the last axis")
    neg = _op(g, cat.input[0], "Neg")
    hi, lo = _op(g, neg.input[0], "Slice"), _op(g, cat.input[1], "Slice")
    x = hi.input[0]
    half = head_dim // 2
    if lo.input[0] != x or _slice_range(g, lo) != (0, half) or _slice_range(g, hi)[0] != half:
        raise Unfusable(f"{t}: rotate_half does not split the whole head in halves (partial or interleaved RoPE)")
    if x not in plain.input:
        raise Unfusable(f"{t}: x * cos does not use the rotated x")
    cos = plain.input[1] if plain.input[0] == x else plain.input[0]
    return x, cos, sin


def _scaled_back(g: Graph, t, stop, limit: int = 16):
    """Walk from ``t`` back to ``stop`` through shape ops and constant scalings; returns the scale product."""
    scale = 1.0
    for _ in range(limit):
        if t == stop:
            return scale
        n = g.prod.get(t)
        if n is None:
            break
        if n.op_type in ("Mul", "Div"):
            c0, c1 = g.const(n.input[0]), g.const(n.input[1])
            c, t = (c1, n.input[0]) if c1 is not None else (c0, n.input[1])
            if c is None or c.size != 1 or (n.op_type == "Div" and c0 is not None):
                raise Unfusable(f"{n.name}: a scaling that is not by a constant scalar")
            scale = scale * float(c.ravel()[0]) if n.op_type == "Mul" else scale / float(c.ravel()[0])
        elif n.op_type in ("Reshape", "Transpose", "Expand", "Unsqueeze"):
            t = n.input[0]
        else:
            break
    raise Unfusable(f"{t}: the attention's key is not the cache ({stop}) through shape ops and scalings")


def _forward_one(g: Graph, t, ops):
    c = [n for n in g.cons.get(t, []) if n.op_type in ops]
    if len(c) != 1:
        raise Unfusable(f"{t}: expected one consumer of {ops}")
    return c[0]


def match_layer(g: Graph, i: int, head_dim: int) -> dict:
    """The tensors of layer ``i``'s attention (raises Unfusable when its pattern is not the plain one)."""
    pk, pv, ok, ov = (f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key",
                      f"present.{i}.value")
    ck, cv = _op(g, ok, "Concat"), _op(g, ov, "Concat")
    if (list(ck.input)[:1] != [pk] or list(cv.input)[:1] != [pv] or len(ck.input) != 2 or len(cv.input) != 2
            or attr(ck, "axis") not in (2, -2) or attr(cv, "axis") not in (2, -2)):
        raise Unfusable(f"layer {i}: present is not Concat(past, new) on the sequence axis")
    v3d = _unhead(g, cv.input[1])
    kt, cos, sin = _rotary(g, ck.input[1], head_dim)
    k3d = _unhead(g, kt)
    # from the cached values forward to the attention's PV MatMul (through repeat_kv's shape ops)
    t, pvmm = ov, None
    for _ in range(8):
        mm = [n for n in g.cons.get(t, []) if n.op_type == "MatMul" and n.input[1] == t]
        if mm:
            pvmm = mm[0]
            break
        t = _forward_one(g, t, ("Unsqueeze", "Expand", "Reshape")).output[0]
    if pvmm is None:
        raise Unfusable(f"layer {i}: no attention MatMul reads the cached values")
    probs = pvmm.input[0]
    n = g.prod.get(probs)
    if n is not None and n.op_type == "Where":  # SDPA's IsNaN guard on fully masked rows
        probs = n.input[2]
    sm = _op(g, probs, "Softmax")
    if attr(sm, "axis", -1) not in (-1, 3):
        raise Unfusable(f"layer {i}: softmax not over the keys")
    s = sm.input[0]
    n = g.prod.get(s)
    if n is not None and n.op_type == "Add":  # the mask; GroupQueryAttention gets its own from attention_mask
        s = n.input[0] if g.prod.get(n.input[0]) is not None and g.prod[n.input[0]].op_type == "MatMul" else n.input[1]
    qk = _op(g, s, "MatMul")
    # the query side: scalings back to the rotated query
    sq, t = 1.0, qk.input[0]
    while g.prod.get(t) is not None and g.prod[t].op_type in ("Mul", "Div"):
        m = g.prod[t]
        c = g.const(m.input[1])
        if c is None or c.size != 1:
            raise Unfusable(f"layer {i}: a query scaling that is not a constant scalar")
        sq = sq * float(c.ravel()[0]) if m.op_type == "Mul" else sq / float(c.ravel()[0])
        t = m.input[0]
    qt, qcos, qsin = _rotary(g, t, head_dim)
    if (qcos, qsin) != (cos, sin):
        raise Unfusable(f"layer {i}: query and key rotated by different tables")
    q3d = _unhead(g, qt)
    sk = _scaled_back(g, qk.input[1], ok)
    t = pvmm.output[0]
    nxt = g.cons.get(t, [])
    if len(nxt) == 1 and nxt[0].op_type == "Reshape":  # Phi-3: back to (B, N, S, D) first
        t = nxt[0].output[0]
    tr = _forward_one(g, t, ("Transpose",))
    if list(attr(tr, "perm", [])) != [0, 2, 1, 3]:
        raise Unfusable(f"layer {i}: attention output not transposed back to BSND")
    out = _forward_one(g, tr.output[0], ("Reshape",))
    return {"q": q3d, "k": k3d, "v": v3d, "cos": cos, "sin": sin, "scale": sq * sk, "out": out.output[0],
            "drop": [ck, cv, out], "past": (pk, pv), "present": (ok, ov)}


def rotary_caches(g: Graph, cos: str, sin: str, head_dim: int, positions: int):
    """(cos_cache, sin_cache) of shape (positions, head_dim / 2): the graph's own tables evaluated at
    positions 0..positions-1 (so any RoPE scaling the export computed is kept)."""
    import onnx
    import onnxruntime as ort

    need, stack, nodes = set(), [cos, sin], []
    while stack:
        t = stack.pop()
        if t in need or t in g.inits or not t:
            continue
        need.add(t)
        n = g.prod.get(t)
        if n is None:
            if t != "position_ids":
                raise Unfusable(f"the rotary tables depend on {t}, not only on position_ids (dynamic RoPE)")
            continue
        stack.extend(n.input)
    nodes = [n for n in g.g.node if any(o in need for o in n.output)]
    used = {i for n in nodes for i in n.input}
    pos_in = next(i for i in g.g.input if i.name == "position_ids")
    sub = onnx.helper.make_graph(nodes, "rotary", [pos_in],
                                 [onnx.helper.make_tensor_value_info(c, onnx.TensorProto.FLOAT, None) for c in (cos, sin)],
                                 [t for t in g.g.initializer if t.name in used])
    m = onnx.helper.make_model(sub, opset_imports=list(g.model.opset_import), ir_version=g.model.ir_version)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    c, s = sess.run(None, {"position_ids": np.arange(positions, dtype=np.int64)[None]})
    out = []
    for a in (c, s):
        a = a.reshape(-1, head_dim)
        if a.shape[0] != positions or not np.array_equal(a[:, :head_dim // 2], a[:, head_dim // 2:]):
            raise Unfusable("the rotary tables are not cat(freqs, freqs) over the whole head")
        out.append(np.ascontiguousarray(a[:, :head_dim // 2].astype(np.float32)))
    return out


def _shared_inputs(g: Graph) -> dict:
    """seqlens_k (every row the full length), total_sequence_length, and the padding bias (B, 1, S, T)."""
    import onnx
    from onnx import TensorProto

    mk = onnx.helper.make_node
    c = {k: g.add_init(f"gqa_{k}", v) for k, v in {
        "one_i32": np.array(1, np.int32), "one_f": np.array(1.0, np.float32), "masked": np.array(MASKED, np.float32),
        "ax12": np.array([1, 2], np.int64), "one_1d": np.array([1], np.int64)}.items()}
    nodes = [
        mk("Shape", ["attention_mask"], ["gqa_batch"], start=0, end=1),
        mk("Shape", ["attention_mask"], ["gqa_t1"], start=1, end=2),
        mk("Squeeze", ["gqa_t1"], ["gqa_total64"]),
        mk("Cast", ["gqa_total64"], ["gqa_total_len"], to=TensorProto.INT32),
        mk("Sub", ["gqa_total_len", c["one_i32"]], ["gqa_total_m1"]),
        mk("Expand", ["gqa_total_m1", "gqa_batch"], ["gqa_seqlens_k"]),
        mk("Cast", ["attention_mask"], ["gqa_mask_f"], to=TensorProto.FLOAT),
        mk("Sub", [c["one_f"], "gqa_mask_f"], ["gqa_pad"]),
        mk("Mul", ["gqa_pad", c["masked"]], ["gqa_bias2"]),
        mk("Unsqueeze", ["gqa_bias2", c["ax12"]], ["gqa_bias4"]),
        mk("Shape", ["input_ids"], ["gqa_s1"], start=1, end=2),
        mk("Concat", ["gqa_batch", c["one_1d"], "gqa_s1", "gqa_t1"], ["gqa_bias_shape"], axis=0),
        mk("Expand", ["gqa_bias4", "gqa_bias_shape"], ["gqa_attention_bias"]),
    ]
    for k, n in enumerate(nodes):
        n.name = f"gqa_shared_{k}_{n.op_type}"
    return {"nodes": nodes, "seqlens_k": "gqa_seqlens_k", "total": "gqa_total_len", "bias": "gqa_attention_bias"}


def fuse_attention(g: Graph, layers: int, kv_heads: int, head_dim: int, max_positions: int) -> int:
    """Every layer's rotary + attention + cache concat -> RotaryEmbedding x2 + GroupQueryAttention (all or none)."""
    import onnx

    past = next(i for i in g.g.input if i.name == "past_key_values.0.key")
    if past.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise Unfusable("the cache is not float32 (the padding bias is built in float32)")
    found = [match_layer(g, i, head_dim) for i in range(layers)]
    shapes = last_dims(g.model)
    cos_c, sin_c = rotary_caches(g, found[0]["cos"], found[0]["sin"], head_dim, max_positions)
    cos_name, sin_name = g.add_init("gqa_cos_cache", cos_c), g.add_init("gqa_sin_cache", sin_c)
    shared = _shared_inputs(g)
    new_nodes = list(shared["nodes"])
    for i, f in enumerate(found):
        qdim = shapes.get(f["q"])
        if not qdim or qdim % head_dim:
            raise Unfusable(f"layer {i}: query width unknown")
        heads = qdim // head_dim
        if heads % kv_heads:
            raise Unfusable(f"layer {i}: {heads} query heads not a multiple of {kv_heads} key/value heads")
        rq, rk = f"gqa_{i}_q_rot", f"gqa_{i}_k_rot"
        new_nodes.append(onnx.helper.make_node("RotaryEmbedding", [f["q"], "position_ids", cos_name, sin_name], [rq],
                                               name=f"gqa_{i}_RotaryQ", domain=MS, num_heads=heads, interleaved=0))
        new_nodes.append(onnx.helper.make_node("RotaryEmbedding", [f["k"], "position_ids", cos_name, sin_name], [rk],
                                               name=f"gqa_{i}_RotaryK", domain=MS, num_heads=kv_heads, interleaved=0))
        new_nodes.append(onnx.helper.make_node(
            "GroupQueryAttention", [rq, rk, f["v"], *f["past"], shared["seqlens_k"], shared["total"], "", "", "",
                                    shared["bias"]],
            [f["out"], *f["present"]], name=f"gqa_{i}_GroupQueryAttention", domain=MS, num_heads=heads,
            kv_num_heads=kv_heads, scale=float(f["scale"]), do_rotary=0))
    # the new nodes read each layer's projections: the order is rebuilt topologically
    drop = {d.output[0] for f in found for d in f["drop"]}
    nodes = [n for n in g.g.node if n.output[0] not in drop] + new_nodes
    del g.g.node[:]
    g.g.node.extend(toposort(nodes, {i.name for i in g.g.input} | set(g.inits)))
    if not any(o.domain == MS for o in g.model.opset_import):
        g.model.opset_import.append(onnx.helper.make_opsetid(MS, 1))
    g.refresh()
    return len(found)


# -- norms (onnxruntime's passes) and cleanup --------------------------------------------------------------
def fuse_norms(model) -> None:
    import logging

    import onnxruntime.transformers  # noqa: F401  (puts its modules on the path its own imports use)
    from onnxruntime.transformers.fusion_simplified_layernorm import (FusionSimplifiedLayerNormalization,
                                                                      FusionSkipSimplifiedLayerNormalization)
    from onnxruntime.transformers.onnx_model import OnnxModel

    for name in ("onnxruntime.transformers", "fusion_base", "onnx_model", "symbolic_shape_infer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rank = ranks(model)

    class Rank3(FusionSimplifiedLayerNormalization):
        """Hidden states only: a per-head norm (Qwen3's and Gemma 3's QK-norm, rank 4) stays as exported, since
        onnxruntime's fused norms with a residual take rank 2 or 3 and the plain one is not valid ONNX."""

        def fuse(self, node, input_name_to_nodes, output_name_to_node):
            if rank.get(node.output[0], 3) == 3:
                super().fuse(node, input_name_to_nodes, output_name_to_node)

    om = OnnxModel(model)
    Rank3(om).apply()
    FusionSkipSimplifiedLayerNormalization(om).apply()
    om.prune_graph()
    _ms_domain_norms(model)


def _ms_domain_norms(model) -> None:
    """onnxruntime registers SimplifiedLayerNormalization in the ONNX domain, which the ONNX checker (and any
    other runtime) rejects at opset 18; the first norm (no residual before it) becomes the com.microsoft
    SkipSimplifiedLayerNormalization of x + x with epsilon x 4: RMSNorm(2x, 4 eps) = RMSNorm(x, eps), and
    the scalings by 2 and 4 are exact in floating point."""
    import onnx

    for n in model.graph.node:
        if n.op_type == "SimplifiedLayerNormalization" and n.domain in ("", "ai.onnx") and len(n.input) >= 2:
            eps = float(attr(n, "epsilon", 1e-5))
            x, gamma, y = n.input[0], n.input[1], n.output[0]
            new = onnx.helper.make_node("SkipSimplifiedLayerNormalization", [x, x, gamma], [y], name=n.name,
                                        domain=MS, epsilon=4 * eps)
            n.CopyFrom(new)


FUSED_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
             "GroupQueryAttention")


def fuse_model(model, *, layers: int, kv_heads: int, head_dim: int, max_positions: int = 4096,
               sliding_window: int | None = None) -> dict:
    """Rewrite ``model`` (a ModelProto of retool's decoder export) in place; returns what was fused and why
    not. The attention is fused in every layer or in none (the shared inputs are built once)."""
    before = len(model.graph.node)
    info: dict = {"nodes_before": before, "skipped": {}}
    try:
        fuse_norms(model)
    except Exception as exc:  # onnxruntime's passes on a graph they do not expect: left as it was
        info["skipped"]["norms"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    sort_graph(model)  # onnxruntime's passes append the fused nodes at the end
    g = Graph(model)
    info["merged_matmul_groups"] = merge_sibling_matmuls(g)
    if sliding_window is not None:
        info["skipped"]["attention"] = (f"sliding-window attention ({sliding_window} tokens): the cache contract "
                                        f"keeps the whole past, GroupQueryAttention's window is not fused here")
    elif not any(i.name == "position_ids" for i in g.g.input):
        info["skipped"]["attention"] = "no position_ids input"
    else:
        snapshot = model.SerializeToString()
        try:
            info["attention_layers"] = fuse_attention(g, layers, kv_heads, head_dim, max_positions)
            info["rotary_positions"] = max_positions
        except Unfusable as exc:
            model.ParseFromString(snapshot)
            info["skipped"]["attention"] = str(exc)
    sort_graph(model)
    prune(model)
    if any(n.domain == MS for n in model.graph.node) and not any(o.domain == MS for o in model.opset_import):
        import onnx

        model.opset_import.append(onnx.helper.make_opsetid(MS, 1))
    ops = op_counts(model)
    info.update({"nodes_after": len(model.graph.node), "fused_ops": {k: ops.get(k, 0) for k in FUSED_OPS},
                 "matmuls": ops.get("MatMul", 0)})
    return info


def fuse_file(src, dst, **kw) -> dict:
    """``fuse_model`` on an ONNX file (external data kept external when the source had it)."""
    import onnx

    from retool.fsutil import external_data_files

    model = onnx.load(str(src))
    info = fuse_model(model, **kw)
    large = bool(external_data_files(src)) or model.ByteSize() > 1_900_000_000
    onnx.save(model, str(dst), save_as_external_data=large, all_tensors_to_one_file=True,
              location=f"{dst.name}.data" if large else None)
    return info
