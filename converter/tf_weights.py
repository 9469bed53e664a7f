"""TensorFlow models over 2 GB: the weights stay out of every graph while tf2onnx converts.

tf2onnx's own large-model path freezes every variable into the GraphDef, copies the constants into
its graph, deep-copies that graph before each optimizer pass and keeps the tensors once more for
the external file: a 2.2 GB Keras MLP peaked at 6.8x its size. Here the large variables are not
frozen. Each becomes a typed Placeholder (its ReadVariableOps become Identity), tf2onnx converts a
graph that holds only small constants, and the ONNX graph inputs that stand for the variables become
external initializers, written one variable at a time straight from TensorFlow's buffer. Peak
memory is then the source model plus the largest single tensor.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

#: Variables with at least this many elements stay out of the graph (tf2onnx's external threshold).
APART_MIN_ELEMENTS = 1024
#: External tensors start at multiples of this, so onnxruntime can map them instead of copying.
EXTERNAL_ALIGN = 4096


@dataclasses.dataclass
class ApartWeights:
    """The variables kept out of the graph: ONNX name (input, then initializer) -> variable."""

    variables: dict[str, object]

    def write(self, proto, path: Path) -> None:
        """Turn the weight inputs into initializers stored in ``path.name + '.data'``."""
        write_apart(proto, self, path)


def freeze_small(concrete, variables=(), min_elements: int | None = None):
    """``concrete``'s graph with only its small variables frozen.

    ``variables``: the source's own variables, for captures that the traced graph does not list
    (a loaded SavedModel's signature called inside the trace).
    Returns (GraphDef, {placeholder tensor name: ONNX name}, ApartWeights)."""
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        _FunctionConverterDataInEager,
        _replace_variables_by_constants,
    )

    min_elements = APART_MIN_ELEMENTS if min_elements is None else min_elements
    by_handle = {}
    for v in list(variables) + list(concrete.graph.variables):
        v = v if isinstance(v, tf.Variable) else getattr(v, "value", v)  # a Keras variable wraps a tf.Variable
        with contextlib.suppress(AttributeError, ValueError, TypeError):  # a variable without a handle
            by_handle[id(v.handle)] = v
    apart: dict[str, object] = {}
    for external, internal in concrete.graph.captures:
        var = by_handle.get(id(external))
        if var is not None and var.shape.is_fully_defined() and int(np.prod(var.shape)) >= min_elements:
            apart[internal.op.name] = var

    def inlined():
        return _FunctionConverterDataInEager(concrete, lower_control_flow=False, aggressive_inlining=True,
                                             variable_names_denylist=set(apart))

    data = inlined()
    aliases = _aliases(data.graph_def, set(apart))
    # after inlining, a variable that a loop or a call still takes as a resource cannot become a
    # float input (an LSTM's kernels inside its While): freeze it after all
    in_loops = {p for p, (_, bad) in aliases.items() if bad}
    if in_loops:
        for name in in_loops:
            apart.pop(name)
        data = inlined()
        aliases = _aliases(data.graph_def, set(apart))
    graph_def, _ = _replace_variables_by_constants(converter_data=data)
    alias_of = {a: p for p, (names, _) in aliases.items() for a in names}
    for node in graph_def.node:
        if node.op == "Placeholder" and node.name in apart:
            var = apart[node.name]
            node.attr["dtype"].type = var.dtype.as_datatype_enum
            node.attr["shape"].shape.CopyFrom(tf.TensorShape(var.shape).as_proto())
            node.attr.pop("_user_specified_name", None)
        elif node.op == "Identity" and node.name in alias_of:  # an inlined call's input: now a float
            node.attr["T"].type = apart[alias_of[node.name]].dtype.as_datatype_enum
        elif node.op == "ReadVariableOp" and node.input and _name(node.input[0]) in alias_of:
            dtype = node.attr["dtype"].type
            node.op = "Identity"
            node.attr.clear()
            node.attr["T"].type = dtype
    missing = set(apart) - {n.name for n in graph_def.node}
    if missing:  # the inliner renamed a capture: freezing it would be wrong, so say so
        raise RuntimeError(f"captured variables not found in the inlined graph: {sorted(missing)[:3]}")
    names = _initializer_names(apart)
    return (graph_def, {f"{p}:0": names[p] for p in apart},
            ApartWeights({names[p]: v for p, v in apart.items()}))


def _name(inp: str) -> str:
    return inp.lstrip("^").split(":")[0]


def _aliases(graph_def, placeholders: set[str]) -> dict[str, tuple[set[str], bool]]:
    """For each resource placeholder: the Identity nodes that pass it on (inlined call inputs), and
    whether anything but Identity and ReadVariableOp takes it."""
    users: dict[str, list] = {}
    for node in graph_def.node:
        for inp in node.input:
            if not inp.startswith("^"):
                users.setdefault(_name(inp), []).append(node)
    out = {}
    for p in placeholders:
        names, todo, bad = {p}, [p], False
        while todo:
            for node in users.get(todo.pop(), []):
                if node.op == "Identity" and node.name not in names:
                    names.add(node.name)
                    todo.append(node.name)
                elif node.op not in ("Identity", "ReadVariableOp"):
                    bad = True
        out[p] = (names, bad)
    return out


def _initializer_names(apart: dict[str, object]) -> dict[str, str]:
    """Readable, unique names: the variable's path (``dense_3/kernel``), not its capture placeholder."""
    out: dict[str, str] = {}
    seen: set[str] = set()
    for p, v in apart.items():
        base = str(getattr(v, "path", None) or v.name).split(":")[0] or p
        name, i = base, 1
        while name in seen:
            name, i = f"{base}_{i}", i + 1
        seen.add(name)
        out[p] = name
    return out


def write_apart(proto, apart: ApartWeights, path: Path) -> None:
    """Make each weight graph input an external initializer, streaming its bytes from TensorFlow."""
    import numpy as np
    import onnx

    used = {vi.name for vi in proto.graph.input}  # tf2onnx drops the inputs of pruned variables
    data_name = path.name + ".data"
    with open(path.parent / data_name, "wb") as f:
        for name, var in apart.variables.items():
            if name not in used:
                continue
            arr = np.ascontiguousarray(var.numpy())
            t = onnx.TensorProto()
            t.name = name
            t.data_type = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
            t.dims.extend(arr.shape)
            f.write(b"\0" * (-f.tell() % EXTERNAL_ALIGN))
            offset = f.tell()
            f.write(memoryview(arr).cast("B"))
            del arr
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(f.tell() - offset))):
                e = t.external_data.add()
                e.key, e.value = k, v
            proto.graph.initializer.append(t)
    keep = [vi for vi in proto.graph.input if vi.name not in apart.variables]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
