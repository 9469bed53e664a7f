"""fp16 conversion with onnxconverter-common, fp32 inputs and outputs kept.

``convert_float_to_float16(keep_io_types=True)`` breaks graphs in which a graph
output also feeds another node (the Cast it inserts renames the tensor the
other consumers read), so such outputs first get an Identity of their own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from retool.errors import OptimizationError


def isolate_graph_outputs(model) -> int:
    """Give every graph output that another node also reads its own Identity. Returns how many."""
    from onnx import helper

    g = model.graph
    consumed = {i for n in g.node for i in n.input}
    produced = {o: n for n in g.node for o in n.output}
    fixed = 0
    for out in g.output:
        if out.name in consumed and out.name in produced:
            inner = out.name + "__retool_inner"
            for n in g.node:  # rename the tensor everywhere, then re-expose it under its old name
                n.input[:] = [inner if x == out.name else x for x in n.input]
                n.output[:] = [inner if x == out.name else x for x in n.output]
            g.node.append(helper.make_node("Identity", [inner], [out.name], name=f"retool_identity_{out.name}"))
            fixed += 1
    return fixed


def convert_fp16(src, dst, exclude: Sequence[str] = (), external: bool = False) -> list[str]:
    """Write an fp16 copy of ``src`` to ``dst``; nodes named in ``exclude`` stay fp32."""
    import onnx
    from onnxconverter_common import float16

    warnings = []
    model = onnx.load(str(src))  # one copy with weights; converted in place
    fixed = isolate_graph_outputs(model)
    if fixed:
        warnings.append(f"{fixed} graph output(s) also feed other nodes; added an Identity before fp16 conversion")
    try:
        model = float16.convert_float_to_float16(
            model, keep_io_types=True, node_block_list=list(exclude) or None,
            disable_shape_infer=external,
        )
    except Exception as exc:
        raise OptimizationError(f"{src}: fp16 conversion failed ({str(exc).splitlines()[0][:200]})") from exc
    if external:
        onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=Path(dst).name + ".data", size_threshold=1024)
    else:
        onnx.save(model, str(dst))
    return warnings


def versions() -> dict[str, str]:
    from retool.deps import version_of

    return {"onnxconverter-common": version_of("onnxconverter-common") or "?"}
