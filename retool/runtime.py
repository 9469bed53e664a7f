"""ONNX Runtime sessions configured the same way everywhere retool runs a model."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def session_options(threads: int | None = None, level: str = "all", spinning: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    # Spinning threads make 2-core medians 30-50 % slower and steal CPU from the
    # other variant when timing interleaved runs.
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def make_session(model, threads: int | None = None, providers: Sequence[str] | None = None,
                 level: str = "all", spinning: bool = False):
    """An InferenceSession for a path or ModelProto (CPU unless providers say otherwise)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(src, sess_options=session_options(threads, level, spinning), providers=chosen)


def run_session(sess, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})
