"""Small in-place edits of an ONNX ModelProto's main graph, for the decoder fusion (optimizers/decoder_fusion.py):
producer/consumer maps, topological order, dead-node pruning."""
from __future__ import annotations

import numpy as np


class Unfusable(Exception):
    """A pattern the rewrite does not handle: the layer is left as exported."""


class Graph:
    """Producer / consumer maps over a ModelProto's main graph (rebuilt after each edit)."""

    def __init__(self, model):
        self.model, self.g = model, model.graph
        self.refresh()

    def refresh(self):
        self.inits = {t.name: t for t in self.g.initializer}
        self.prod = {o: n for n in self.g.node for o in n.output if o}
        self.cons: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                self.cons.setdefault(i, []).append(n)

    def const(self, name):
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        p = self.prod.get(name)
        if p is not None and p.op_type == "Constant":
            return numpy_helper.to_array(p.attribute[0].t)
        return None

    def add_init(self, name, array):
        from onnx import numpy_helper

        self.g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        self.inits[name] = self.g.initializer[-1]
        return name


def attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def replace_nodes(g: Graph, drop_ids: set, new_nodes: list) -> None:
    """Drop the nodes ``drop_ids`` and put ``new_nodes`` where the first of them was (they read only what
    that node could read: the shared input and constants)."""
    nodes = list(g.g.node)
    idx = min(i for i, n in enumerate(nodes) if n.output[0] in drop_ids)
    kept = [n for n in nodes[:idx] if n.output[0] not in drop_ids]
    rest = [n for n in nodes[idx:] if n.output[0] not in drop_ids]
    del g.g.node[:]
    g.g.node.extend(kept + new_nodes + rest)
    g.refresh()


def toposort(nodes: list, available: set) -> list:
    ready, out, pending = set(available) | {""}, [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                out.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise Unfusable(f"the rewritten graph has a cycle or a missing input at {rest[0].name}")
        pending = rest
    return out


def sort_graph(model) -> None:
    g = model.graph
    nodes = toposort(list(g.node), {i.name for i in g.input} | {t.name for t in g.initializer})
    del g.node[:]
    g.node.extend(nodes)


def ranks(model) -> dict:
    """tensor name -> rank, where shape inference (or the exporter's value_info) knows it."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    return {vi.name: len(vi.type.tensor_type.shape.dim) for vi in list(inferred.graph.value_info)
            + list(model.graph.value_info) if vi.type.tensor_type.HasField("shape")}


def last_dims(model) -> dict:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    out = {}
    for vi in list(inferred.graph.value_info) + list(model.graph.value_info):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            out[vi.name] = dims[-1].dim_value
    return out


def prune(model) -> None:
    """Drop nodes nothing reads (transitively), then initializers and value_info nothing names."""
    g = model.graph
    live = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in live for o in n.output):
            keep.append(n)
            live.update(i for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in live]
    del g.initializer[:]
    g.initializer.extend(inits)
    made = {o for n in g.node for o in n.output}
    vis = [v for v in g.value_info if v.name in made]
    del g.value_info[:]
    g.value_info.extend(vis)


def op_counts(model) -> dict:
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops
