"""Safe values for integer inputs, the dims used for dynamic axes, and the user's axis names.

Random integer inputs are drawn from 0..7 (``retool.inputs.DEFAULT_INT_HIGH``) unless a range
is known. Ranges come, in this order, from ``--input ids:int64:batch,seq:0..30521``, from the
model (the ``Gather`` table an input indexes in the ONNX graph; the smallest ``nn.Embedding`` of
a torch module, or its Hugging Face ``config.vocab_size``). When a run still fails on an index,
:func:`index_hint` says it is probably the random inputs and how to give real ones.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

from retool.types import TensorSpec

#: Ops that pass integer values through unchanged (on their first input), between an input and a Gather.
_PASS_THROUGH = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Transpose", "Expand",
                 "Slice", "Tile"}
_INT = re.compile(r"u?int\d*$")


def is_integer(spec: TensorSpec) -> bool:
    return bool(_INT.match(spec.dtype))


def ranges_from_graph(model) -> dict[str, tuple[int, int]]:
    """{integer graph input: (0, table size - 1)} for inputs that index a constant Gather table."""
    g = model.graph
    dims = {i.name: list(i.dims) for i in g.initializer}
    for n in g.node:  # Constant nodes hold tables too
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value" and a.t is not None:
                    dims[n.output[0]] = list(a.t.dims)
    for n in g.node:  # a quantized table (QDQ): DequantizeLinear of an initializer has its shape
        if n.op_type == "DequantizeLinear" and n.input and n.input[0] in dims and n.output:
            dims.setdefault(n.output[0], dims[n.input[0]])
    consumers: dict[str, list] = {}
    for n in g.node:
        for k, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, k))
    out = {}
    for vi in g.input:
        if vi.name in dims or vi.type.tensor_type.elem_type not in (2, 3, 4, 5, 6, 7, 12, 13):
            continue  # not an integer runtime input
        sizes, todo, seen = [], [vi.name], set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            for n, k in consumers.get(t, ()):
                if n.op_type == "Gather" and k == 1 and n.input[0] in dims:
                    axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                    shape = dims[n.input[0]]
                    if shape and -len(shape) <= axis < len(shape) and shape[axis] > 0:
                        sizes.append(int(shape[axis]))
                elif n.op_type in _PASS_THROUGH and k == 0:
                    todo.extend(n.output)
        if sizes:
            out[vi.name] = (0, min(sizes) - 1)
    return out


def source_high(module) -> int | None:
    """The largest id every embedding of a torch module accepts (and its HF config's vocab_size)."""
    highs = []
    try:
        import torch

        for m in module.modules():
            if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                highs.append(int(m.num_embeddings) - 1)
    except Exception:  # not a torch module, or torch missing: nothing known
        pass
    vocab = getattr(getattr(module, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        highs.append(vocab - 1)
    return min(highs) if highs else None


def with_ranges(specs: Sequence[TensorSpec], ranges: Mapping[str, tuple[int, int]] | None = None,
                high: int | None = None) -> tuple[TensorSpec, ...]:
    """``specs`` with a value range on every integer input that has none: from ``ranges``, else 0..``high``."""
    out = []
    for s in specs:
        if is_integer(s) and s.value_range is None:
            r = (ranges or {}).get(s.name) or ((0, high) if high is not None and high >= 0 else None)
            if r is not None:
                s = dataclasses.replace(s, value_range=tuple(r))
        out.append(s)
    return tuple(out)


def hf_config_ranges(config, names) -> dict[str, tuple[int, int]]:
    """Ranges a Hugging Face model's config fixes for its integer inputs: token ids below vocab_size,
    token types below type_vocab_size, and an attention mask of ones (random 0/1 masks can hide a
    whole row, which frameworks answer with NaN or a uniform softmax: not a parity question)."""
    out: dict[str, tuple[int, int]] = {}
    names = set(names)
    for name, key in (("input_ids", "vocab_size"), ("token_type_ids", "type_vocab_size")):
        size = getattr(config, key, None)
        if name in names and isinstance(size, int) and size > 0:
            out[name] = (0, size - 1)
    if "attention_mask" in names:
        out["attention_mask"] = (1, 1)
    return out


def prefer(specs: Sequence[TensorSpec], ranges: Mapping[str, tuple[int, int]],
           given: Sequence[TensorSpec] = ()) -> tuple[TensorSpec, ...]:
    """``specs`` with ``ranges`` (a source model's own) over the graph-derived ones; a range the user gave wins."""
    mine = {s.name for s in given if s.value_range is not None}
    return tuple(dataclasses.replace(s, value_range=tuple(ranges[s.name]))
                 if is_integer(s) and s.name in ranges and s.name not in mine else s for s in specs)


def keep_given(specs: Sequence[TensorSpec], given: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
    """The user's (or source model's) ranges win over ones derived from the ONNX graph."""
    by = {s.name: s.value_range for s in given if s.value_range is not None}
    return tuple(dataclasses.replace(s, value_range=by[s.name]) if s.name in by else s for s in specs)


def dims_used(specs: Sequence[TensorSpec], feeds_list: Sequence[Mapping]) -> dict:
    """{axis name: size} for every named dynamic axis, batch sizes as a list (what a run actually fed)."""
    out: dict = {}
    for feeds in feeds_list:
        for s in specs:
            a = feeds.get(s.name)
            if a is None:
                continue
            for i, d in enumerate(s.shape):
                if isinstance(d, int) or i >= a.ndim:
                    continue
                name = "batch" if i == 0 else (d if isinstance(d, str) else f"{s.name}[{i}]")
                size = int(a.shape[i])
                if i == 0:
                    out.setdefault(name, [])
                    if size not in out[name]:
                        out[name].append(size)
                else:
                    out[name] = size
    return out


_INDEX_ERROR = re.compile(r"index out of range|out of bounds|indices element out of data bounds|"
                          r"index .* is out of bounds|idx.*out of range|IndexError", re.I)


def index_hint(message: str, specs: Sequence[TensorSpec], examples=None) -> str:
    """A sentence to add when ``message`` is an index error and integer inputs were random; else ""."""
    if examples is not None or not _INDEX_ERROR.search(message or ""):
        return ""
    ints = [s for s in specs if is_integer(s)]
    if not ints:
        return ""
    from retool.inputs import DEFAULT_INT_HIGH

    def fed(s):
        return f"{s.value_range[0]}..{s.value_range[1]}" if s.value_range else f"0..{DEFAULT_INT_HIGH - 1}"

    s = ints[0]
    got = ", ".join(f"{i.name} got values {fed(i)}" for i in ints)  # any of them may be the one out of range
    dims = ",".join("?" if d is None else str(d) for d in s.shape)
    return (f"; this is probably the random integer inputs ({got}): give real ones with "
            f"--example-inputs FILE.npz, or each valid range in --input, e.g. {s.name}:{s.dtype}:{dims}:0..N")


def rename_dims(path, specs: Sequence[TensorSpec]) -> dict[str, str]:
    """Give the ONNX file's dynamic axes the names the user chose (``seq``, not the exporter's ``s27``).

    Renames each symbol everywhere it appears (inputs, outputs, value_info, expressions such as
    ``s27 + 1``); rewrites only the graph proto (external data stays where it is). Returns {old: new}.
    """
    import onnx

    from retool.fsutil import load_onnx_header

    model = load_onnx_header(path)
    by_name = {s.name: s for s in specs}
    mapping: dict[str, str] = {}
    taken = set()
    for vi in model.graph.input:
        spec = by_name.get(vi.name)
        if spec is None:
            continue
        for d, want in zip(vi.type.tensor_type.shape.dim, spec.shape):
            if isinstance(want, str) and d.dim_param and d.dim_param != want and d.dim_param not in mapping:
                if want not in taken:
                    mapping[d.dim_param] = want
                    taken.add(want)
    if not mapping:
        return {}
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b")
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: mapping[m.group(1)], d.dim_param)
    onnx.save(model, str(path))
    return mapping
