"""Name the dynamic axes of an exported graph after the user's / the ecosystem's names.

The dynamo exporter names every dynamic axis ``s<N>``; serving configs and clients read
the names, so they are mapped back from the input specs (``s41`` -> ``sequence``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def rename_dims(path, inputs: Mapping[str, Sequence], outputs: Mapping[str, Sequence] = ()) -> dict[str, str]:
    """Rewrite dim_params in place: for each named tensor, axis i gets the name in its shape list.

    Symbols learnt from the inputs are also renamed wherever else they appear (other outputs,
    value_info). Returns the symbol -> name mapping.
    """
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    wanted = {**dict(inputs), **dict(outputs or {})}
    mapping: dict[str, str] = {}
    for vi in list(g.input) + list(g.output):
        shape = wanted.get(vi.name)
        if shape is None:
            continue
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if i < len(shape) and isinstance(shape[i], str) and d.HasField("dim_param"):
                mapping.setdefault(d.dim_param, shape[i])
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        shape = wanted.get(vi.name)
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if shape is not None and i < len(shape) and isinstance(shape[i], str):
                d.dim_param = shape[i]
            elif d.HasField("dim_param") and d.dim_param in mapping:
                d.dim_param = mapping[d.dim_param]
    onnx.save(model, str(path))
    return mapping
