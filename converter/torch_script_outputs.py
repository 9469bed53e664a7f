"""ScriptModules whose forward returns a dict, for the TorchScript exporter.

``torch.onnx`` cannot export a ScriptModule with dynamo, and the TorchScript exporter has no ONNX
translation for ``aten::dict`` / ``prim::DictConstruct`` / ``aten::_set_item`` / ``aten::__getitem__``, which DeepLabV3-style
models build in their scripted forward (``result = OrderedDict(); result["out"] = ...``). Once the
model is traced inside a wrapper that returns the dict's values as a flat tuple (names kept by
torch_outputs), each ``d[key]`` can be replaced by the tensor stored under that key, and the
dict disappears from the graph.
"""
from __future__ import annotations


def _const_str(value):
    node = value.node()
    if node.kind() != "prim::Constant":
        return None
    try:
        v = value.toIValue()
    except Exception:
        return None
    return v if isinstance(v, str) else None


def flatten_script_dicts(torch, traced):
    """``traced`` (or a frozen copy) with the dicts its scripted code builds replaced by their tensors.

    A dict filled in a branch on a module attribute (torchvision's ``if self.aux_classifier is not None``)
    needs the module frozen first, so that constant propagation removes the branch."""
    forward_dict_items(torch, traced)
    if not _dicts(traced.graph):
        return traced
    try:
        frozen = torch.jit.freeze(traced.eval())
        torch._C._jit_pass_constant_propagation(frozen.graph)
    except Exception:  # freezing is best effort; the exporter then names the dict
        return traced
    forward_dict_items(torch, frozen)
    return traced if _dicts(frozen.graph) else frozen


_DICT_KINDS = ("aten::dict", "prim::DictConstruct")


def _dicts(graph) -> list:
    return [n for n in graph.nodes() if n.kind() in _DICT_KINDS]


#: what the TorchScript exporter's refusal of a dict means for the user
DICT_HINT = ("the scripted forward builds a dict that retool could not flatten (a key computed at run time or set "
             "in a loop); return a tuple, a NamedTuple or a dict whose keys are constants")


def forward_dict_items(torch, traced) -> int:
    """Inline ``traced``'s forward and replace reads of locally built dicts by what was stored; returns how
    many dicts were removed. A dict used otherwise (in a branch, a loop, with a computed key) is left as it is."""
    graph = traced.graph
    torch._C._jit_pass_inline(graph)
    removed, skipped = 0, set()
    while True:
        node = next((n for n in _dicts(graph) if n.output().unique() not in skipped), None)
        if node is None:
            break
        if _forward_one(node, graph):
            removed += 1
        else:
            skipped.add(node.output().unique())
    if removed:
        torch._C._jit_pass_dce(graph)
    return removed


def _forward_one(node, graph) -> bool:
    d = node.output()
    want = len(d.uses())
    items = list(node.inputs())  # a literal {k: v, ...} is DictConstruct(k1, v1, k2, v2 ...)
    keys = [_const_str(k) for k in items[0::2]]
    if None in keys:
        return False
    current: dict[str, object] = dict(zip(keys, items[1::2]))
    plan = []  # (node, the value its output becomes or None for a store)
    for n in graph.nodes():  # the top-level block, in program order
        ins = list(n.inputs())
        if not ins or ins[0].unique() != d.unique():
            continue
        key = _const_str(ins[1]) if len(ins) > 1 else None
        if n.kind() == "aten::_set_item" and key is not None and len(ins) == 3:
            current[key] = ins[2]
            plan.append((n, None))
        elif n.kind() == "aten::__getitem__" and key in current:
            plan.append((n, current[key]))
        else:
            return False
    if len(plan) != want:
        return False  # a use inside a branch or a loop
    for n, value in plan:
        if value is not None:
            n.output().replaceAllUsesWith(value)
    for n, _ in reversed(plan):
        n.destroy()
    node.destroy()
    return True
