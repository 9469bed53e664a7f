"""Frozen TensorFlow GraphDef (``.pb`` / ``.pbtxt``) -> ONNX with tf2onnx, verified by running the graph."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from retool.converter.base import ConvertRequest, ExportResult, SourceModel
from retool.converter.tf_source import _nchw, _resolve_specs, _spec_from_shape
from retool.converter.tf_export import check_opset, finalize, import_tf, import_tf2onnx, run_tf2onnx
from retool.deps import version_of
from retool.errors import ConversionError, UsageError
from retool.types import TensorSpec

#: Ops that are not outputs even when nothing consumes them.
_NON_OUTPUT_OPS = {"NoOp", "Const", "Assert", "Placeholder", "SaveV2", "RestoreV2", "VarHandleOp",
                   "VariableV2", "Variable", "AssignVariableOp", "Assign", "PlaceholderWithDefault"}
_VARIABLE_OPS = {"VariableV2", "Variable", "VarHandleOp"}


def _tensor(name: str) -> str:
    return name if ":" in name else f"{name}:0"


def _node_named(specs: Sequence[TensorSpec], nodes: Mapping, path: Path, placeholders) -> tuple[TensorSpec, ...]:
    """``--input`` specs named by node: ``input:0`` (a tensor name) is the node ``input``'s only output."""
    out, unknown = [], []
    for s in specs:
        node, _, index = s.name.rpartition(":") if re.fullmatch(r".+:\d+", s.name) else (s.name, "", "")
        if node not in nodes:
            unknown.append(s.name)
            continue
        if index and index != "0":
            raise UsageError(f"{path}: --input {s.name}: a placeholder has one output, {node}:0")
        out.append(dataclasses.replace(s, name=node))
    if unknown:
        raise UsageError(f"{path}: --input names {unknown} are not nodes or tensors of the graph; placeholders "
                         f"are: {', '.join(n.name for n in placeholders) or 'none'} (as NAME or NAME:0)")
    return tuple(out)


def load_graphdef(path: Path, request: ConvertRequest) -> "GraphDefSource":
    tf = import_tf()
    gd = tf.compat.v1.GraphDef()
    try:
        data = path.read_bytes()
        if path.suffix.lower() == ".pbtxt":
            from google.protobuf import text_format

            text_format.Parse(data.decode(), gd)
        else:
            gd.ParseFromString(data)
    except Exception as exc:
        raise ConversionError(f"{path}: not a TensorFlow GraphDef ({type(exc).__name__}); the file may be "
                              f"truncated or corrupt") from None
    if not gd.node:
        raise ConversionError(f"{path}: the GraphDef has no nodes; is it really a frozen graph?")
    variables = [n.name for n in gd.node if n.op in _VARIABLE_OPS]
    if variables:
        raise ConversionError(f"{path}: the graph still holds variables ({', '.join(variables[:3])}); freeze it "
                              f"first (convert_variables_to_constants) or convert the SavedModel instead")
    return GraphDefSource(path, gd, request)


class GraphDefSource(SourceModel):
    framework = "tensorflow"

    def __init__(self, path: Path, gd, request: ConvertRequest):
        tf = import_tf()
        self.tf, self.gd, self.path, self.request = tf, gd, path, request
        nodes = {n.name: n for n in gd.node}
        placeholders = [n for n in gd.node if n.op == "Placeholder"]
        declared = []
        for n in placeholders:
            shape = n.attr["shape"].shape
            dims = None if shape.unknown_rank else [d.size if d.size >= 0 else None for d in shape.dim]
            declared.append(_spec_from_shape(n.name, tf.as_dtype(n.attr["dtype"].type), dims))
        given = _node_named(request.inputs, nodes, path, placeholders)
        given_names = [s.name for s in given]
        if given_names:
            by = {s.name: s for s in declared}
            # a bare name (``--input x:0``) keeps what the graph declares
            given = tuple(by[g.name] if not g.shape and by.get(g.name) and by[g.name].shape else g for g in given)
            for g in given:
                d = by.get(g.name)
                if d is not None and d.shape and (len(d.shape) != len(g.shape) or any(
                        isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(d.shape, g.shape))):
                    raise UsageError(f"{path}: --input {g} does not fit placeholder {g.name}, "
                                     f"which the graph declares as {d}")
            declared = [by.get(n, TensorSpec(n)) for n in given_names]
        self.input_specs_src = _resolve_specs(tuple(declared), dataclasses.replace(request, inputs=given))
        if not self.input_specs_src:
            raise UsageError(f"{path}: the graph has no placeholders; name its inputs with --input NAME:DTYPE:SHAPE")
        outputs = (request.options or {}).get("output_names")
        if outputs:
            missing = [o for o in outputs if o.split(":")[0] not in nodes]
            if missing:
                raise UsageError(f"{path}: --output-names {missing} are not nodes of the graph")
        else:
            consumed = {i.lstrip("^").split(":")[0] for n in gd.node for i in n.input}
            sinks = [n.name for n in gd.node if n.name not in consumed and n.op not in _NON_OUTPUT_OPS]
            if len(sinks) != 1:
                raise UsageError(f"{path}: cannot tell the graph's output; candidates: "
                                 f"{', '.join(sinks) or 'none'}; pass --output-names NAME[,NAME...]")
            outputs = sinks
        self.output_tensors = [_tensor(o) for o in outputs]
        self.output_names = [t[:-2] if t.endswith(":0") else t for t in self.output_tensors]
        self.nchw = {s.name for s in self.input_specs_src if len(s.shape) == 4} if (
            request.options or {}).get("inputs_as_nchw") else set()
        self.input_specs = tuple(_nchw(s) if s.name in self.nchw else s for s in self.input_specs_src)
        self.source_files = (path,)
        self.versions = {"tensorflow": tf.__version__, "tf2onnx": version_of("tf2onnx") or "",
                         "onnx": version_of("onnx") or ""}
        self._sess = None

    def export(self, path: Path, opset: int | None) -> ExportResult:
        tf2onnx = import_tf2onnx()
        opset = check_opset(opset)
        ins = [_tensor(s.name) for s in self.input_specs_src]
        rename = {**{_tensor(s.name): s.name for s in self.input_specs_src},
                  **dict(zip(self.output_tensors, self.output_names))}
        shapes = {_tensor(s.name): [d if isinstance(d, int) else None for d in s.shape]
                  for s in self.input_specs_src} if self.request.inputs else None
        nchw = [_tensor(n) for n in sorted(self.nchw)] or None
        proto, _ = run_tf2onnx(lambda: tf2onnx.convert.from_graph_def(
            self.gd, name=self.path.stem, input_names=ins, output_names=self.output_tensors, opset=opset,
            inputs_as_nchw=nchw, tensors_to_rename=rename, shape_override=shapes), str(self.path), opset)
        finalize(proto, self.input_specs, self.output_names, path)
        return ExportResult("tf2onnx.convert.from_graph_def", {"source_kind": "graphdef", "opset": opset,
                                                              "outputs": self.output_names})

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        tf = self.tf
        if self._sess is None:
            graph = tf.Graph()
            with graph.as_default():
                tf.import_graph_def(self.gd, name="")
            self._sess = tf.compat.v1.Session(graph=graph)
        outs = self._sess.run(self.output_tensors, {_tensor(s.name): feeds[s.name] for s in self.input_specs_src})
        return [np.asarray(o) for o in outs]

    def reference_feeds(self, feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        return {k: np.ascontiguousarray(np.transpose(v, (0, 2, 3, 1))) if k in self.nchw else v
                for k, v in feeds.items()}

    def close(self) -> None:
        if self._sess is not None:
            self._sess.close()
            self._sess = None
