"""Rewrite an exporter's decomposed self-attention into ``com.microsoft.Attention``.

onnxruntime's transformer optimizer fuses attention only in the patterns the TorchScript
exporter writes. The torch dynamo exporter writes scaled_dot_product_attention decomposed
(the scale split into two Muls on Q and on K^T, the key transposed through Reshapes, a
``Where`` mask and an ``IsNaN`` guard after the Softmax), which it does not match. This pass
matches loosely around each Softmax (Q, K and V traced back through layout ops and scalar
scales to three Linear layers of one input) and then proves each rewrite numerically: the
block's output in the rewritten graph is compared with the original on inputs with padding.
A block that does not match or does not agree stays as it was.

One Attention holds the packed QKV weights (one GEMM instead of three), and dynamic
quantization turns it into QAttention (int8 QKV).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

LAYOUT = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")
MS_DOMAIN = "com.microsoft"
#: A rewritten block agrees when its output is within this of the original's (fp32 softmax reordering).
ATOL, RTOL = 1e-4, 1e-3


@dataclass
class Block:
    softmax: str  # the Softmax node's name (the block's key in reports)
    x: str  # the Linear layers' shared input (batch, seq, hidden)
    out: str  # the tensor the block produces, as the out-projection reads it
    w: list  # [Wq, Wk, Wv] (hidden, hidden) arrays
    b: list  # [bq, bk, bv]
    num_heads: int
    scale: float  # the product of every scalar on the scores
    mask: str | None  # the additive mask's tensor, or None
    mask_input: str | None = None  # the graph input the mask comes from (2-D int: 1 keep, 0 pad)
    seq_first: bool = False  # x is (seq, batch, hidden), a Transpose of the (batch, seq, hidden) tensor used
    out_rank: int = 3  # out is (batch, seq, hidden) [3] or (batch * seq, hidden) [2], in x's order


@dataclass
class Result:
    model: object  # onnx.ModelProto
    rewritten: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"attention_blocks": len(self.rewritten), "skipped": dict(self.skipped)}


class _Graph:
    def __init__(self, model):
        import onnx
        from onnx import numpy_helper

        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.consts = {}
        self.prod, self.cons = {}, {}
        for n in self.g.node:
            for o in n.output:
                self.prod[o] = n
            for i in n.input:
                self.cons.setdefault(i, []).append(n)
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)
                    elif a.name == "value_float":
                        self.consts[n.output[0]] = np.array(a.f, dtype=np.float32)
        self._np = numpy_helper
        self.inputs = {i.name: i for i in self.g.input if i.name not in self.inits}
        self.shapes = {}
        for vi in list(self.g.value_info) + list(self.g.input) + list(self.g.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        self.onnx = onnx

    def const(self, name):
        if name in self.inits:
            return self._np.to_array(self.inits[name])
        n = self.prod.get(name)
        if n is not None and n.op_type == "Transpose" and (v := self.const(n.input[0])) is not None:
            perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
            return np.transpose(v, perm)
        return self.consts.get(name)

    def scalar(self, name):
        v = self.const(name)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None

    def strip_scale(self, t):
        """Follow scalar Mul/Div back from ``t``: the tensor before them and their product."""
        scale = 1.0
        while (n := self.prod.get(t)) is not None and n.op_type in ("Mul", "Div"):
            a, b = n.input[0], n.input[1]
            if (s := self.scalar(b)) is not None:
                scale, t = (scale * s if n.op_type == "Mul" else scale / s), a
            elif n.op_type == "Mul" and (s := self.scalar(a)) is not None:
                scale, t = scale * s, b
            else:
                break
        return t, scale

    def linear(self, t):
        """Trace ``t`` back through layout ops and scalar scales to x @ W (+ b): (x, W, b, scale) or a reason.

        A Gather or Split on the way picks one part of a packed projection (torch's in_proj: Q, K, V
        in one (hidden, 3 hidden) weight)."""
        scale, part = 1.0, None
        for _ in range(32):
            t, s = self.strip_scale(t)
            scale *= s
            n = self.prod.get(t)
            if n is None:
                return f"{t} is not computed by a Linear layer"
            if n.op_type in LAYOUT:
                t = n.input[0]
                continue
            if n.op_type in ("Gather", "Split") and part is None:
                if n.op_type == "Gather":
                    idx = self.const(n.input[1])
                    if idx is None or idx.size != 1:
                        return f"{t} is gathered at a computed index"
                    part = int(idx.reshape(-1)[0])
                else:
                    part = list(n.output).index(t)
                t = n.input[0]
                continue
            bias = None
            if n.op_type == "Add":
                for i in (0, 1):
                    c, other = self.const(n.input[i]), n.input[1 - i]
                    p = self.prod.get(other)
                    if c is not None and c.ndim == 1 and p is not None and p.op_type == "MatMul":
                        bias, n = c, p
                        break
                else:
                    return f"{t} comes from an Add that is not a Linear layer's bias"
            if n.op_type != "MatMul":
                return f"{t} comes from {n.op_type}, not a Linear layer"
            w = self.const(n.input[1])
            if w is None or w.ndim != 2:
                return f"{t} comes from a MatMul without a constant 2-D weight"
            if bias is not None and bias.shape[0] != w.shape[1]:
                return f"{t}: bias and weight sizes differ"
            if part is not None:
                h = w.shape[0]
                if w.shape[1] != 3 * h or not 0 <= part < 3:
                    return f"{t}: a part of a projection that is not a packed QKV"
                w, bias = w[:, part * h:(part + 1) * h], None if bias is None else bias[part * h:(part + 1) * h]
            return n.input[0], w.astype(np.float32), bias, scale
        return f"{t}: too many layout ops"


def find_blocks(model) -> tuple[list[Block], dict[str, str]]:
    """Every Softmax that is one self-attention block; the others with the reason."""
    g = _Graph(model)
    blocks, skipped = [], {}
    for i, n in enumerate(g.g.node):
        if n.op_type != "Softmax":
            continue
        key = n.name or f"Softmax#{i}"
        got = _match(g, n)
        if isinstance(got, str):
            skipped[key] = got
        else:
            got.softmax = key
            blocks.append(got)
    return blocks, skipped


def _match(g: _Graph, sm):
    axis = next((a.i for a in sm.attribute if a.name == "axis"), -1)
    rank = len(g.shapes.get(sm.input[0]) or [None] * 4)
    if axis not in (-1, rank - 1):
        return f"softmax over axis {axis}, not the keys"
    # forward: [Where(IsNaN(p), 0, p)] then p @ V
    p = sm.output[0]
    users = g.cons.get(p, [])
    if {u.op_type for u in users} == {"IsNaN", "Where"} and len(users) == 2:
        where = next(u for u in users if u.op_type == "Where")
        if g.scalar(where.input[1]) != 0.0 or where.input[2] != p:
            return "the softmax guard is not Where(IsNaN(p), 0, p)"
        p = where.output[0]
        users = g.cons.get(p, [])
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != p:
        return "the softmax output is not multiplied by V alone"
    pv = users[0]
    out = pv.output[0]
    while len(u := g.cons.get(out, [])) == 1 and u[0].op_type in ("Transpose", "Reshape"):
        out = u[0].output[0]
    if out == pv.output[0]:
        return "no head merge (Transpose/Reshape) after p @ V"
    # backward: [Mul/Div scalar] [Add mask] [Mul/Div scalar] Q @ K^T
    t, scale = g.strip_scale(sm.input[0])
    mask = None
    n = g.prod.get(t)
    if n is not None and n.op_type == "Add":
        for i in (0, 1):
            cand, s = g.strip_scale(n.input[i])
            q = g.prod.get(cand)
            if q is not None and q.op_type == "MatMul" and g.const(q.input[1]) is None:
                mask, t, scale = n.input[1 - i], cand, scale * s
                break
        else:
            return "the scores are not QK^T plus a mask"
        n = g.prod.get(t)
    if n is None or n.op_type != "MatMul":
        return "the softmax input is not QK^T"
    traced = [g.linear(n.input[0]), g.linear(n.input[1]), g.linear(pv.input[1])]
    for what, tr in zip("QKV", traced):
        if isinstance(tr, str):
            return f"{what}: {tr}"
    (xq, wq, bq, sq), (xk, wk, bk, sk), (xv, wv, bv, sv) = traced
    if not xq == xk == xv:
        return "Q, K and V do not read the same input (not self-attention)"
    hidden = wq.shape[0]
    if not (wq.shape == wk.shape == wv.shape == (hidden, hidden)):
        return f"Q/K/V weights {wq.shape}, {wk.shape}, {wv.shape} are not square and equal"
    heads = (g.shapes.get(sm.input[0]) or [None, None])[1] or (g.shapes.get(pv.output[0]) or [None, None])[1]
    if not heads or hidden % heads:
        return "the number of heads is not known from the graph's shapes"
    out_rank = len(g.shapes[out]) if out in g.shapes else None
    if out_rank not in (2, 3):
        return "the merged heads' rank is not known from the graph's shapes"
    seq_first = False
    tp = g.prod.get(xq)
    if tp is not None and tp.op_type == "Transpose" and \
            next((list(a.ints) for a in tp.attribute if a.name == "perm"), None) == [1, 0, 2]:
        xq, seq_first = tp.input[0], True  # torch's batch_first MultiheadAttention works seq-first inside
    zeros = np.zeros(hidden, np.float32)
    b = [zeros if x is None else x.astype(np.float32) for x in (bq, bk, bv)]
    return Block("", xq, out, [wq, wk, wv * sv], [b[0], b[1], b[2] * sv], int(heads), scale * sq * sk, mask,
                 seq_first=seq_first, out_rank=out_rank)


def _data_inputs(g: _Graph, t: str) -> list[str]:
    """The graph inputs ``t`` depends on through their values (a Shape is no data dependency)."""
    seen, stack, found = set(), [t], []
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in g.inputs:
            found.append(t)
            continue
        n = g.prod.get(t)
        if n is not None and n.op_type != "Shape":
            stack.extend(i for i in n.input if i)
    return found


def _mask_input(g: _Graph, found: list[str]) -> str | None:
    """The one 2-D integer input among ``found`` (prefers one named *mask*): the padding mask."""
    found = [t for t in found if g.inputs[t].type.tensor_type.elem_type in (6, 7, 9)  # int32, int64, bool
             and len(g.inputs[t].type.tensor_type.shape.dim) == 2]
    named = [f for f in found if "mask" in f.lower()]
    return (named or found)[0] if len(named or found) == 1 else None


def apply(model, blocks: list[Block]):
    """A copy of ``model`` with ``blocks`` replaced by Attention nodes, the dead nodes removed."""
    import copy

    from onnx import TensorProto, helper, numpy_helper

    m = copy.deepcopy(model)
    g = m.graph
    casts: dict[str, str] = {}
    att: dict[str, list] = {}
    replaced = {b.out for b in blocks}
    keep = [n for n in g.node if not set(n.output) & replaced]
    new_nodes = []
    for k, b in enumerate(blocks):
        d = b.w[0].shape[0] // b.num_heads
        factor = b.scale * math.sqrt(d)  # the kernel's default scale is 1/sqrt(d): fold the rest into Q
        w = np.concatenate([b.w[0] * factor, b.w[1], b.w[2]], axis=1).astype(np.float32)
        bias = np.concatenate([b.b[0] * factor, b.b[1], b.b[2]]).astype(np.float32)
        wn, bn = f"attention_rewrite.{k}.qkv_weight", f"attention_rewrite.{k}.qkv_bias"
        g.initializer.extend([numpy_helper.from_array(w, wn), numpy_helper.from_array(bias, bn)])
        inputs = [b.x, wn, bn]  # mask: the raw 2-D form (1 attend, 0 padding)
        if b.mask_input:
            if b.mask_input not in casts:
                casts[b.mask_input] = f"attention_rewrite.{b.mask_input}.int32"
                new_nodes.append(helper.make_node("Cast", [b.mask_input], [casts[b.mask_input]],
                                                  name=f"attention_rewrite.cast.{b.mask_input}", to=TensorProto.INT32))
            inputs.append(casts[b.mask_input])
        else:
            inputs.append("")  # ORT's EmbedLayerNormalization fusion reads input 3 of every Attention
        chain, t = [], b.out
        if b.seq_first or b.out_rank == 2:  # back to the layout the out-projection reads
            t = f"{b.out}.attention"
            if b.seq_first:
                chain.append(helper.make_node("Transpose", [t], [t + ".t"], name=f"{t}.transpose", perm=[1, 0, 2]))
                t += ".t"
            if b.out_rank == 2:
                shape = f"attention_rewrite.{k}.shape"
                g.initializer.append(numpy_helper.from_array(np.array([-1, b.w[0].shape[0]], np.int64), shape))
                chain.append(helper.make_node("Reshape", [t, shape], [t + ".2d"], name=f"{t}.reshape"))
                t += ".2d"
            chain[-1].output[0] = b.out
            t = f"{b.out}.attention"
        att[b.out] = [helper.make_node("Attention", inputs, [t], name=f"Attention.{b.softmax}",
                                       domain=MS_DOMAIN, num_heads=b.num_heads)] + chain
    # topological order: each Attention right before the first node that reads its output
    ordered = list(new_nodes)
    for n in keep:
        for i in n.input:
            if i in att:
                ordered.extend(att.pop(i))
        ordered.append(n)
    for nodes in att.values():  # blocks whose output is a graph output
        ordered.extend(nodes)
    g.ClearField("node")
    g.node.extend(ordered)
    if not any(o.domain == MS_DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _prune(m)
    return m


def _prune(m) -> None:
    """Drop nodes nothing reads, then unused initializers and stale value_info."""
    g = m.graph
    needed = {o.name for o in g.output}
    for n in g.node:  # names read inside subgraphs count as read
        for a in n.attribute:
            for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                needed.update(i for sn in sg.node for i in sn.input)
    live = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output if o):
            live.append(n)
            needed.update(i for i in n.input if i)
    live.reverse()
    g.ClearField("node")
    g.node.extend(live)
    inits = [i for i in g.initializer if i.name in needed]
    g.ClearField("initializer")
    g.initializer.extend(inits)
    vis = [v for v in g.value_info if v.name in needed]
    g.ClearField("value_info")
    g.value_info.extend(vis)


def _feeds(model, mask_inputs: set[str], batch: int = 2, seq: int = 16, seed: int = 0) -> dict:
    """Inputs for the proof: ids inside every table they index, masks with right padding."""
    from onnx import helper

    g = _Graph(model)
    rng = np.random.default_rng(seed)
    sizes: dict[str, int] = {}
    feeds = {}
    for name, vi in g.inputs.items():
        tt = vi.type.tensor_type
        shape = []
        for j, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            else:
                shape.append(sizes.setdefault(d.dim_param or f"{name}:{j}", batch if j == 0 else seq))
        dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dt.kind == "f":
            feeds[name] = rng.standard_normal(shape).astype(dt)
        elif name in mask_inputs and len(shape) == 2:
            lengths = rng.integers(max(1, shape[1] // 2), shape[1] + 1, size=shape[0])
            lengths[0] = max(1, shape[1] - 3)  # at least one padded row
            feeds[name] = (np.arange(shape[1])[None, :] < lengths[:, None]).astype(dt)
        elif dt.kind in "iub":
            rows = [len(g.const(n.input[0])) for n in g.cons.get(name, [])
                    if n.op_type == "Gather" and g.const(n.input[0]) is not None]
            feeds[name] = rng.integers(0, min(rows) if rows else 2, size=shape).astype(dt)
        else:
            raise ValueError(f"input {name}: no proof inputs for dtype {dt}")
    return feeds


def _run(model, feeds, extra: list[str]) -> dict:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    outputs = model.graph.output
    n = len(outputs)
    have = {o.name for o in outputs}
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    outputs.extend(helper.make_tensor_value_info(t, types.get(t) or TensorProto.FLOAT, None)
                   for t in dict.fromkeys(extra) if t not in have)
    try:  # the extra outputs only for this session: no copy of a large model
        data = model.SerializeToString()
    finally:
        del outputs[n:]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(None, feeds)))


def _agree(a, b) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, atol=ATOL, rtol=RTOL))


def rewrite(model) -> Result:
    """``model`` with every self-attention block that matches and agrees as one Attention node."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shapes are a help (the head count); the graph's own value_info may do
        pass
    blocks, skipped = find_blocks(model)
    g = _Graph(model)
    usable, shape_only = [], []
    for b in blocks:
        if b.mask is not None:
            found = _data_inputs(g, b.mask)
            if not found:  # built from shapes alone (ViT's all-pass mask, or a causal one): looked at below
                shape_only.append(b)
            elif (mi := _mask_input(g, found)) is None:
                skipped[b.softmax] = "the mask does not come from one 2-D integer input (a padding mask)"
                continue
            b.mask_input = mi if found else None
        usable.append(b)
    if not usable:
        return Result(model, [], skipped)
    feeds = _feeds(model, {b.mask_input for b in usable if b.mask_input})
    outs = [b.out for b in usable]
    ref = _run(model, feeds, outs + [b.mask for b in shape_only])
    for b in shape_only:
        if np.any(ref[b.mask] != 0):
            skipped[b.softmax] = "a mask computed from shapes alone that is not all zeros (causal?)"
            usable.remove(b)
        else:
            b.mask = None
    if not usable:
        return Result(model, [], skipped)
    agreed = []
    trial = apply(model, usable)
    got = _run(trial, feeds, outs)
    if all(_agree(ref[b.out], got[b.out]) for b in usable):
        agreed = usable
    else:  # one block at a time: an error in one reaches every later block through the residual
        for b in usable:
            got = _run(apply(model, [b]), feeds, [b.out])
            if _agree(ref[b.out], got[b.out]):
                agreed.append(b)
            else:
                err = float(np.max(np.abs(ref[b.out] - got[b.out]))) if ref[b.out].shape == got[b.out].shape \
                    else "shape"
                skipped[b.softmax] = f"the Attention node disagrees with the original block (max |diff| {err})"
        if not agreed:
            return Result(model, [], skipped)
        trial = apply(model, agreed)
        got = _run(trial, feeds, [])
    if not all(_agree(ref[o.name], got[o.name]) for o in model.graph.output if o.name in got):
        return Result(model, [], {**skipped, "model": "the rewritten model's outputs disagree; nothing rewritten"})
    return Result(trial, [b.softmax for b in agreed], skipped)
