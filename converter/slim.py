"""Drop the torch exporter's per-node debug metadata from a converted file.

torch.onnx (dynamo) stores a stack trace, the FX node and the module class chain on every node.
Nothing reads them at serving time, and on small models they are most of the file: 347 of a
452 KB int4 decoder. The module scope (``pkg.torch.onnx.name_scopes``) stays: the accuracy
search names the source layer of a node from it (``namespace`` only where the scopes are absent).
"""
from __future__ import annotations

from pathlib import Path

DROPPED = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy")


def slim_node_metadata(path: Path) -> int:
    """Rewrite ``path``'s graph proto without the debug metadata (external data stays where it is).

    Returns the number of entries dropped; the file is untouched when there were none."""
    import onnx

    from retool.fsutil import all_graphs, load_onnx_header

    model = load_onnx_header(path)
    dropped = 0
    for graph in all_graphs(model.graph):
        for node in graph.node:
            keys = {p.key for p in node.metadata_props}
            # "namespace" repeats the scopes with class names: the layer name falls back on it only without them
            drop = DROPPED + (("namespace",) if "pkg.torch.onnx.name_scopes" in keys else ())
            keep = [p for p in node.metadata_props if p.key not in drop]
            if len(keep) != len(node.metadata_props):
                dropped += len(node.metadata_props) - len(keep)
                del node.metadata_props[:]
                node.metadata_props.extend(keep)
    if dropped:
        onnx.save(model, str(path))
    return dropped
