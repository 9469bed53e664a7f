"""What an ExportedProgram (``.pt2``) says about itself: its inputs, how it is called, which batch sizes it allows.

The program is the authority: it was traced at its declared shapes, and its
guards fail at any other. So its placeholder shapes and range constraints win
over shapes guessed from ``--example-inputs``, and it is called the way it was
exported (positional arguments and keyword arguments, from ``call_spec.in_spec``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from retool.errors import UsageError
from retool.types import TensorSpec

#: The batch sizes parity is checked at when the program allows them (retool.inputs.VERIFY_BATCH_SIZES).
PREFERRED_BATCHES = (1, 4)


@dataclass(frozen=True)
class ProgramInputs:
    specs: tuple[TensorSpec, ...]
    #: None when the batch axis is dynamic; else the one batch size the program was exported at
    static_batch: int | None
    #: the batch sizes to verify at (within the range constraints)
    verify_batches: tuple[int, ...]
    #: keyword names of the user inputs (empty for a positional call)
    keywords: tuple[str, ...]
    #: (min, max or None) of a dynamic batch axis
    batch_range: tuple[int, int | None] | None = None
    #: input name -> {axis: size} of the non-batch axes the program fixed (torch.export specialised them)
    fixed_axes: Mapping[str, Mapping[int, int]] | None = None

    def pinned_note(self) -> str | None:
        """One line for the report when a program with a dynamic batch fixes an axis of a non-image input
        (a sequence, usually: torch.export specialises what it cannot trace symbolically, e.g. nn.LSTM)."""
        if self.static_batch is not None or not self.fixed_axes:
            return None
        shown = {n: ax for n, ax in self.fixed_axes.items()
                 if ax and len(next(s for s in self.specs if s.name == n).shape) != 4}
        if not shown:
            return None
        what = "; ".join(f"{n}: axis {', '.join(f'{a} = {v}' for a, v in sorted(ax.items()))}"
                         for n, ax in shown.items())
        return (f"the program fixes {what} (torch.export specialised it): other sizes are refused; re-export "
                f"with torch.export.Dim for that axis if the model allows it")


def _range(ep, sym) -> tuple[int, int | None]:
    expr = sym.node.expr
    vr = ep.range_constraints.get(expr)
    if vr is None:
        return 1, None
    lo = int(vr.lower) if vr.lower.is_finite else 1
    hi = int(vr.upper) if vr.upper.is_finite else None
    return max(lo, 1), hi


def read_program(torch, ep) -> ProgramInputs:
    sig = ep.graph_signature
    user = [s.arg.name for s in sig.input_specs if s.kind.name == "USER_INPUT"]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    specs, batch_ranges, static, fixed = [], [], set(), {}
    for name in user:
        val = nodes[name].meta.get("val")
        if val is None:
            continue
        dims: list = []
        for i, d in enumerate(val.shape):
            if isinstance(d, torch.SymInt):
                dims.append("batch" if i == 0 else str(d))
                if i == 0:
                    batch_ranges.append(_range(ep, d))
            else:
                dims.append(int(d))
                if i == 0:
                    static.add(int(d))
                else:
                    fixed.setdefault(name, {})[i] = int(d)
        specs.append(TensorSpec(name, str(val.dtype).replace("torch.", ""), tuple(dims)))
    in_spec = ep.call_spec.in_spec
    keywords: tuple[str, ...] = ()
    if in_spec is not None and in_spec.num_children == 2:
        kw = in_spec.child(1) if hasattr(in_spec, "child") else in_spec.children_specs[1]
        keywords = tuple(str(k) for k in (kw.context or ()))
    static_batch = next(iter(static)) if static and not batch_ranges and len(static) == 1 else None
    if static_batch is not None:
        verify = (static_batch,)
    elif batch_ranges:
        lo = max(r[0] for r in batch_ranges)
        his = [r[1] for r in batch_ranges if r[1] is not None]
        hi = min(his) if his else None
        verify = tuple(sorted({min(max(b, lo), hi) if hi is not None else max(b, lo) for b in PREFERRED_BATCHES}))
    else:
        verify = ()
    rng = None
    if batch_ranges:
        his = [r[1] for r in batch_ranges if r[1] is not None]
        rng = (max(r[0] for r in batch_ranges), min(his) if his else None)
    return ProgramInputs(tuple(specs), static_batch, verify, keywords, rng, fixed)


def call(torch, module, ep, args: Sequence):
    """Call the unflattened program with ``args`` (its user inputs, flat) as it was exported."""
    from torch.utils import _pytree as pytree

    in_spec = ep.call_spec.in_spec
    if in_spec is None:
        return module(*args)
    pos, kw = pytree.tree_unflatten(list(args), in_spec)
    return module(*pos, **kw)


def check_examples(label: str, program: ProgramInputs, examples: Mapping[str, np.ndarray]) -> list[str]:
    """Example arrays must fit the program's static dims; a different batch is the one allowed mismatch."""
    notes = []
    by = {s.name: s for s in program.specs}
    unknown = [k for k in examples if k not in by]
    if unknown:
        raise UsageError(f"{label}: --example-inputs has {unknown}, which the program does not take; "
                         f"its inputs are {', '.join(str(s) for s in program.specs)}")
    for name, arr in examples.items():
        spec = by[name]
        if arr.ndim != len(spec.shape) or any(isinstance(d, int) and d != a for i, (d, a) in
                                               enumerate(zip(spec.shape, arr.shape)) if i > 0):
            raise UsageError(f"{label}: example input {name} has shape {list(arr.shape)}, but the program "
                             f"was exported for {spec}; give arrays of that shape")
    if program.static_batch is not None:
        batches = {a.shape[0] for a in examples.values() if a.ndim}
        if batches - {program.static_batch}:
            notes.append(f"the program's batch is static ({program.static_batch}); the example inputs "
                         f"(batch {', '.join(map(str, sorted(batches)))}) were cut or repeated to that batch")
    return notes
