"""Names for a torch model's outputs, read from what it returns.

Mapping keys (dict, OrderedDict, Hugging Face ``ModelOutput``) and namedtuple
or dataclass fields are kept, in order; nested structures become ``a.b``
(a key or field under a key) and ``a_0`` (an item of a sequence under a key).
Unnamed outputs are ``output`` (one) or ``output_0 .. output_N``. The order is
torch's pytree order (dict insertion order), which is the order both torch.onnx
exporters and ``ExportedProgram`` flatten outputs in.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from retool.errors import ConversionError, UsageError

#: where the ONNX output names came from, as the report says it
FROM_MODEL = "model"  # keys / fields of what the model returns
FROM_USER = "--output-names"
POSITIONAL = "positional"  # nothing named them: output, output_0 ...


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _items(out) -> list[tuple[str, Any]] | None:
    """(name, value) pairs of a named container, or None when ``out`` is not one."""
    if isinstance(out, Mapping):
        return [(str(k), v) for k, v in out.items()]
    if _is_namedtuple(out):
        return list(zip(type(out)._fields, out))
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    return None


def flatten_named(torch, out) -> tuple[list[tuple[str, Any]], bool]:
    """``[(name, tensor)]`` in export order, and whether any name came from the model itself."""
    flat: list[tuple[list[str], Any]] = []  # path parts per tensor
    named = False

    def walk(x, path: list[str]):
        nonlocal named
        if x is None:
            return  # exporters drop None outputs (ModelOutput leaves them out too)
        if isinstance(x, torch.Tensor):
            flat.append((path, x))
            return
        items = _items(x)
        if items is not None:
            named = True
            for k, v in items:
                walk(v, path + [f".{k}"])
            return
        if isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, path + [f"_{i}"])
            return
        if hasattr(x, "to_tuple"):
            walk(x.to_tuple(), path)
            return
        raise ConversionError(f"the model returned a {type(x).__name__}; expected tensors, or dicts, "
                              f"tuples, lists or dataclasses of tensors")

    walk(out, [])
    names = []
    for parts, _ in flat:
        if not parts:
            names.append("output")
        elif parts[0].startswith("."):
            names.append("".join(parts)[1:])
        else:  # a top-level sequence
            names.append("output" + "".join(parts))
    if len(flat) == 1 and not named and names[0] != "output":
        names = ["output"]  # a one-tensor tuple
    return list(zip(names, (t for _, t in flat))), named


#: where the names came from when a transformers model returned a plain tuple
HF_NAMED = "transformers ModelOutput (return_dict=True)"


def hf_output_names(torch, module, args, found: list[str]) -> tuple[list[str], object]:
    """(names, where they came from) from the ModelOutput of a transformers ``PreTrainedModel`` (pickled with
    ``return_dict=False``, or traced: see traced_hf_names) when its fields line up with the tuple it returned;
    else (found, False)."""
    if isinstance(module, torch.jit.ScriptModule):
        return traced_hf_names(torch, module, args, found)
    if not any(c.__name__ == "PreTrainedModel" for c in type(module).__mro__):
        return found, False
    try:
        with torch.no_grad():
            out = module(*args, return_dict=True)
        pairs, named = flatten_named(torch, out)
    except Exception:  # the positional names stay
        return found, False
    if not named or len(pairs) != len(found):
        return found, False
    return [n for n, _ in pairs], HF_NAMED


def traced_class_name(module) -> str:
    """The qualified name TorchScript keeps for a traced/scripted module's original class, e.g.
    ``__torch__.transformers.models.bert.modeling_bert.BertModel`` (mangling segments dropped); '' if none."""
    try:
        qn = module._c.qualified_name
    except Exception:
        return ""
    return ".".join(p for p in qn.split(".") if not p.startswith("___torch_mangle"))


def _transformers_class(qualified: str):
    """The transformers PreTrainedModel class named by ``qualified``, or None (only the installed library is
    imported, never the source's own code)."""
    import importlib

    if not qualified.startswith("__torch__.transformers."):
        return None
    modname, _, name = qualified[len("__torch__."):].rpartition(".")
    try:
        import transformers

        cls = getattr(importlib.import_module(modname), name, None)
    except Exception:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


def _output_class(cls):
    """The ModelOutput dataclass ``cls.forward`` is annotated to return, or None."""
    import typing

    from transformers.utils import ModelOutput

    fwd = cls.forward
    try:
        ret = typing.get_type_hints(fwd).get("return")
    except Exception:
        ret = getattr(fwd, "__annotations__", {}).get("return")
        if isinstance(ret, str):  # a forward reference: look the name up in the model's module
            import sys

            ns = vars(sys.modules[cls.__module__])
            ret = next((ns.get(t.strip()) for t in ret.replace("|", ",").replace("[", ",").replace("]", ",")
                        .split(",") if isinstance(ns.get(t.strip()), type) and issubclass(ns[t.strip()], ModelOutput)),
                       None)
    stack = [ret]
    while stack:
        t = stack.pop()
        if isinstance(t, type) and issubclass(t, ModelOutput):
            return t
        stack.extend(typing.get_args(t))
    return None


#: the rank each well-known HF output has; a traced tensor of another rank means the names do not line up
_HF_RANKS = {"last_hidden_state": (3,), "pooler_output": (2,), "logits": (2, 3), "start_logits": (2,),
             "end_logits": (2,), "image_embeds": (2,), "text_embeds": (2,)}


def traced_hf_names(torch, module, args, found: list[str]) -> tuple[list[str], object]:
    """Names for a TorchScript module traced from a transformers model (``torch.jit.trace`` keeps no output
    names, but its class's qualified name survives, also through ``torch.jit.save``/``load``): the fields of
    the ModelOutput its ``forward`` is annotated to return, in order, without ``loss`` (a trace without
    ``labels`` returns none) and as many as the module returned. Only single-tensor fields are used, and each
    known field must have its usual rank. A module traced inside a wrapper (``__torch__.Wrapper``) has lost
    its class: (found, False), and the names stay positional."""
    import dataclasses
    import typing

    cls = _transformers_class(traced_class_name(module))
    if cls is None:
        return found, False
    try:
        out_cls = _output_class(cls)
        if out_cls is None:
            return found, False
        hints = typing.get_type_hints(out_cls)
        inputs = {v.debugName().split(".")[0] for v in list(module.graph.inputs())[1:]}
        fields = [f.name for f in dataclasses.fields(out_cls) if f.name != "loss" or "labels" in inputs]
        single = []
        for name in fields:  # the leading fields that hold one tensor (not a tuple of them, not a cache)
            ann = str(hints.get(name, ""))
            if "tuple" in ann.lower() or "cache" in ann.lower() or "Tensor" not in ann:
                break
            single.append(name)
        if not found or len(found) > len(single):
            return found, False
        names = single[:len(found)]
        with torch.no_grad():
            pairs, _ = flatten_named(torch, module(*args))
        if any(n in _HF_RANKS and t.dim() not in _HF_RANKS[n] for n, (_, t) in zip(names, pairs)):
            return found, False
    except Exception:  # the positional names stay
        return found, False
    return names, (f"transformers {cls.__name__}.forward returns {out_cls.__name__} (class from the traced "
                   f"module's TorchScript name)")


def unique(names: Sequence[str], taken: Sequence[str] = ()) -> list[str]:
    """ONNX value names must be unique, also against the graph's input names."""
    used = set(taken)
    out = []
    for n in names:
        cand, i = n, 1
        while cand in used:
            cand = f"{n}_{i}"
            i += 1
        used.add(cand)
        out.append(cand)
    return out


def choose_names(found: Sequence[str], named: bool, wanted: Sequence[str] | None, input_names: Sequence[str],
                 label: str) -> tuple[list[str], str]:
    """The ONNX output names and where they came from (FROM_USER, FROM_MODEL or POSITIONAL)."""
    if wanted:
        wanted = [w.strip() for w in wanted]
        if len(wanted) != len(found):
            raise UsageError(f"{label}: --output-names gives {len(wanted)} name(s) but the model has "
                             f"{len(found)} output(s): {', '.join(found)}; give one name per output, in that order")
        if len(set(wanted)) != len(wanted) or set(wanted) & set(input_names) or not all(wanted):
            raise UsageError(f"{label}: --output-names {','.join(wanted)}: names must be non-empty, distinct, "
                             f"and differ from the input names ({', '.join(input_names)})")
        return list(wanted), FROM_USER
    return unique(found, input_names), FROM_MODEL if named else POSITIONAL


def is_flat(torch, out) -> bool:
    """A tensor or a plain list/tuple of tensors: what every exporter takes as it is."""
    if isinstance(out, torch.Tensor):
        return True
    return isinstance(out, (list, tuple)) and not _is_namedtuple(out) and all(
        isinstance(t, torch.Tensor) for t in out)


def flat_module(torch, module):
    """``module`` returning its outputs as one flat tuple, in flatten_named order."""

    class FlatOutputs(torch.nn.Module):
        takes_varargs = True

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            pairs, _ = flatten_named(torch, self.inner(*args))
            return tuple(t for _, t in pairs)

    return FlatOutputs(module).eval()


def short_error(exc: BaseException) -> str:
    """The line that says what went wrong, from the deepest cause (torch.onnx nests them)."""
    import re

    chain = []
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in reversed(chain):
        text = str(e)
        m = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)'", text)
        if m:
            return f"unsupported operator {m.group(1)} (no ONNX translation)"
        m = re.search(r"Exporting the operator '([\w:.]+)' to ONNX opset version (\d+) is not supported", text)
        if m:
            return f"unsupported operator {m.group(1)} at opset {m.group(2)}"
    lines = [l.strip() for l in str(chain[-1]).splitlines() if l.strip()]
    return f"{type(chain[-1]).__name__}: {(lines[0] if lines else '')[:400]}"
