"""tf2onnx, made strict and quiet: lazy TF import, captured "unsupported op" errors, tidy I/O names.

tf2onnx always converts with continue_on_error=True: an op it cannot map is
only logged and stays in the graph as a raw TF op. Here such a log record (or
any node that is not a standard ONNX op) becomes a ConversionError naming the
op and the node (whose name carries the Keras layer path).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from retool.errors import ConversionError, UsageError, first_line
from retool.types import TensorSpec

#: one-line error text; this module keeps its own length limit
_first_line = partial(first_line, limit=400)

OPSET_RANGE = (13, 18)
#: Above this many bytes of weights, the variables stay out of the graphs (a protobuf cannot
#: pass 2 GB) and go to one external data file beside the model (tf_weights).
LARGE_MODEL_BYTES = 1_900_000_000
#: On the usual path TensorFlow's freezing and tf2onnx's passes peak near 21x the weights (a 570 MB
#: Keras MLP: 12.2 GB); when that would not fit in memory, the weights are kept apart as well.
USUAL_PATH_PEAK = 22
DEFAULT_OPSET = 15
_UNSUPPORTED = re.compile(r"Tensorflow op \[(?P<node>[^:\]]+): (?P<op>[^\]]+)\] is not supported")
_FAILED = re.compile(r"Failed to convert node '?(?P<node>[^'\s]+)'?")
_NOISY_LOGGERS = ("tensorflow", "tf2onnx", "absl", "keras", "tf_keras", "h5py")


def weights_apart_reason(weight_bytes: int, available: int | None = None) -> str | None:
    """Why the variables must stay out of the graphs (see tf_weights), or None for the usual path."""
    if weight_bytes > LARGE_MODEL_BYTES:
        return f"weights {weight_bytes / 1e9:.2f} GB: over the {LARGE_MODEL_BYTES / 1e9:.2f} GB limit for one protobuf"
    if available is None:
        from retool.meminfo import meminfo_bytes

        available = meminfo_bytes("MemAvailable")
    if available is not None and weight_bytes * USUAL_PATH_PEAK > available:
        return (f"weights {weight_bytes / 1e9:.2f} GB: the usual path needs about {USUAL_PATH_PEAK}x that, "
                f"{available / 2**30:.1f} GiB is available")
    return None


def check_opset(opset: int | None, label: str = "") -> int:
    if opset is None:
        return DEFAULT_OPSET
    lo, hi = OPSET_RANGE
    if not lo <= int(opset) <= hi:
        raise UsageError(f"{label + ': ' if label else ''}--opset {opset}: tf2onnx converts TensorFlow/Keras models to opsets {lo}-{hi} "
                         f"(default {DEFAULT_OPSET}); choose one of those")
    return int(opset)


@contextlib.contextmanager
def _stderr_to_file():
    """TF's C++ start-up lines ignore TF_CPP_MIN_LOG_LEVEL; hide fd 2 while importing, replay on failure."""
    try:
        fd = os.dup(2)
    except OSError:  # no real stderr (embedded): nothing to hide
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(fd, 2)
            os.close(fd)
            if not ok:
                tmp.seek(0)
                os.write(2, tmp.read()[-4000:])


def quiet_logs() -> None:
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass


def import_tf():
    """tensorflow (keras 3 on its TF backend), quietly; MissingDependency if absent."""
    import sys

    from retool.deps import require

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if sys.modules.get("tensorflow") is not None:  # already imported: no start-up noise to hide
        tf = sys.modules["tensorflow"]
    else:
        with _stderr_to_file():
            tf = require("tensorflow", "tensorflow", "convert TensorFlow/Keras models")
    quiet_logs()
    tf.get_logger().setLevel(logging.ERROR)
    tf.autograph.set_verbosity(0)
    return tf


def import_tf2onnx():
    from retool.deps import require

    import_tf()
    tf2onnx = require("tf2onnx", "tensorflow", "convert TensorFlow/Keras models")
    from retool.converter import tf_erfc

    tf_erfc.register()
    quiet_logs()
    return tf2onnx


class _Collector(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record):
        try:
            self.records.append(record.getMessage())
        except Exception:  # a bad format string must not hide the conversion
            self.records.append(str(record.msg))


def run_tf2onnx(convert: Callable[[], object], label: str, opset: int):
    """Call a tf2onnx ``from_*`` function; raise ConversionError for anything it could not map.

    Returns (model proto, weights kept apart or None)."""
    import onnx

    logger = logging.getLogger("tf2onnx")
    collector = _Collector()
    old_propagate, old_level = logger.propagate, logger.level
    logger.addHandler(collector)
    logger.propagate = False  # its errors become our one-line error, not log spam
    logger.setLevel(logging.ERROR)
    try:
        proto, storage = convert()
    except (ConversionError, UsageError):
        raise
    except Exception as exc:
        bad = _unsupported(collector.records)
        if bad:
            raise ConversionError(_unsupported_message(label, bad, opset)) from None
        raise ConversionError(f"{label}: tf2onnx failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    finally:
        logger.removeHandler(collector)
        logger.propagate, logger.level = old_propagate, old_level
    bad = _unsupported(collector.records)
    for node in proto.graph.node:  # backstop: anything that is not a real ONNX op
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            bad.setdefault(node.op_type, node.name)
    if bad:
        raise ConversionError(_unsupported_message(label, bad, opset))
    failed = [m for m in collector.records if m.startswith("Failed to convert node")]
    if failed:
        m = _FAILED.match(failed[0])
        raise ConversionError(f"{label}: tf2onnx failed to convert node {m.group('node') if m else '?'} "
                              f"at opset {opset}; try another --opset ({OPSET_RANGE[0]}-{OPSET_RANGE[1]})")
    return proto, storage


def from_function(fn, input_signature, opset: int, inputs_as_nchw=None, large_model: bool = False, variables=()):
    """tf2onnx.convert.from_function, minus one bug: tensors the function captures from eager
    code (a ``tf.constant`` defined outside it) are frozen as constants, not made graph inputs.

    ``large_model``: keep the large variables out of every graph (see tf_weights); the second
    value returned then writes them beside the model; ``variables`` are the source's own."""
    import tensorflow as tf
    from tf2onnx import tf_loader
    from tf2onnx.convert import _convert_common, tensor_names_from_structed

    _fresh_node_protos()
    concrete = fn.get_concrete_function(*input_signature)
    # concrete.inputs lists the user's inputs first, then the captures
    n_user = len(tf.nest.flatten(concrete.structured_input_signature))
    input_names = [t.name for t in concrete.inputs[:n_user]]
    output_names = [t.name for t in concrete.outputs if t.dtype != tf.dtypes.resource]
    rename = tensor_names_from_structed(concrete, input_names, output_names)
    with tf.device("/cpu:0"):
        apart = None
        if large_model:
            from retool.converter.tf_weights import freeze_small

            frozen, names, apart = freeze_small(concrete, variables)
            rename = {**rename, **names}
            input_names = input_names + list(names)
        else:
            frozen = tf_loader.from_function(concrete, input_names, output_names)
        with _frozen_heap():
            proto, _ = _convert_common(frozen, name=concrete.name, continue_on_error=True, opset=opset,
                                       input_names=input_names, output_names=output_names,
                                       inputs_as_nchw=inputs_as_nchw, tensors_to_rename=rename,
                                       optimizers=_collected_optimizers())
        return proto, apart


@contextlib.contextmanager
def _frozen_heap():
    """Keep what exists before tf2onnx runs (the frameworks, the source model) out of the
    collections run before each optimizer pass: walking that heap cost about 0.3 s a pass, 8 s
    of a 17 s convert of a small Keras CNN. The passes' own graph copies are still collected."""
    import gc

    already = gc.get_freeze_count() > 0  # the caller froze its heap: leave that as it chose
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        if not already:
            gc.unfreeze()


def _fresh_node_protos() -> None:
    """Make tf2onnx's Node.update_proto build a new NodeProto instead of editing the old one in place.

    Under protobuf's upb backend a message's arena only grows: ``del op.attribute[:]`` then
    ``extend`` leaves the old attribute tensors allocated, so every optimizer pass (each one calls
    update_proto on every node) kept one more copy of every constant; a 150 MB Keras MLP peaked at
    5 GB on the large-model path. A fresh message per update lets the old arena go."""
    from onnx import NodeProto
    from tf2onnx import graph as tf2onnx_graph

    Node = tf2onnx_graph.Node
    if getattr(Node.update_proto, "_retool_fresh", False):
        return
    original = Node.update_proto

    def update_proto(self, external_tensor_storage=None):
        old = self._op
        fresh = NodeProto()
        fresh.name, fresh.op_type, fresh.domain, fresh.doc_string = old.name, old.op_type, old.domain, old.doc_string
        del old.attribute[:]  # attributes are rebuilt from self._attr below
        self._op = fresh
        original(self, external_tensor_storage)

    update_proto._retool_fresh = True
    Node.update_proto = update_proto


class _CollectFirst:
    """An optimizer factory that first frees the graph copies earlier passes left behind."""

    def __init__(self, factory):
        self.factory = factory

    def __call__(self):
        import gc

        gc.collect()
        return self.factory()


def _collected_optimizers():
    """tf2onnx's optimizers, each preceded by a garbage collection.

    optimize_graph deep-copies the whole graph, constants included, before every pass, and the
    graphs are reference cycles that Python's collector (which counts objects, not bytes) leaves
    for long: a 150 MB Keras MLP peaked at 8.6 GB. Collecting before each pass keeps about three
    copies at most."""
    from tf2onnx import optimizer

    return {name: _CollectFirst(f) for name, f in optimizer._get_optimizers().items()}


def _unsupported(records: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for msg in records:
        m = _UNSUPPORTED.search(msg)
        if m:
            # the layer path reads better without the SavedModel call wrappers
            node = re.sub(r"^((Stateful)?PartitionedCall(_\d+)?/)+", "", m.group("node"))
            out.setdefault(m.group("op"), node)
    return out


def _unsupported_message(label: str, bad: dict[str, str], opset: int) -> str:
    ops = "; ".join(f"op {op} in layer/node {node}" for op, node in bad.items())
    return (f"{label}: tf2onnx cannot convert TensorFlow {ops} (no ONNX mapping at opset {opset}); "
            f"replace that op in the model (or try another --opset); no ONNX file was written")



def finalize(proto, specs: Sequence[TensorSpec], output_order: Sequence[str], path: Path,
             batch_outputs: bool = False, storage=None) -> None:
    """Order outputs as the model declares them, name dynamic input axes after ``specs``, save.

    ``batch_outputs``: axis 0 of every output is the batch (Keras guarantees it), so name it so.
    """
    import onnx

    outs = {o.name: o for o in proto.graph.output}
    missing = [n for n in output_order if n not in outs]
    if missing:
        raise ConversionError(f"tf2onnx lost outputs {missing} (has {sorted(outs)})")
    ordered = [outs[n] for n in output_order] + [o for n, o in outs.items() if n not in output_order]
    copies = [onnx.ValueInfoProto() for _ in ordered]
    for c, o in zip(copies, ordered):
        c.CopyFrom(o)
    del proto.graph.output[:]
    proto.graph.output.extend(copies)

    by_name = {s.name: s for s in specs}
    renames: dict[str, str] = {}
    for vi in proto.graph.input:
        spec = by_name.get(vi.name)
        dims = vi.type.tensor_type.shape.dim
        if spec is None or len(spec.shape) != len(dims):
            continue
        for i, (d, want) in enumerate(zip(dims, spec.shape)):
            if d.HasField("dim_value"):
                continue
            new = "batch" if i == 0 else (want if isinstance(want, str) else f"{spec.name}_dim{i}")
            if d.dim_param:
                renames[d.dim_param] = new
            d.dim_param = new
    for vi in list(proto.graph.output) + list(proto.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in renames:
                d.dim_param = renames[d.dim_param]
    if batch_outputs and any(s.has_dynamic_batch for s in specs):
        for vi in proto.graph.output:
            dims = vi.type.tensor_type.shape.dim
            if dims and not dims[0].HasField("dim_value"):
                dims[0].dim_param = "batch"
    if storage is not None:  # weights kept apart (tf_weights.ApartWeights)
        storage.write(proto, path)
    onnx.save_model(proto, str(path))
