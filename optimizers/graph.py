"""Graph-level optimisation: onnxsim (or onnxoptimizer) then ORT saved offline.

ORT level ALL writes NCHWc layouts specific to the CPU that ran it, so the file
keeps at most EXTENDED and level ALL happens when the model is loaded.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Mapping

import numpy as np

from retool.errors import first_line

#: one-line error text; this module keeps its own length limit
_first_line = partial(first_line, limit=200)


#: Used only when onnxsim is missing or fails (onnxsim runs onnxoptimizer itself).
_ONNXOPTIMIZER_PASSES = ("eliminate_deadend", "eliminate_identity", "eliminate_nop_dropout",
                         "eliminate_nop_transpose", "eliminate_unused_initializer", "fuse_consecutive_transposes",
                         "fuse_transpose_into_gemm", "fuse_bn_into_conv")


@dataclass
class GraphResult:
    path: Path
    tools: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def has_external_data(path) -> bool:
    from retool.fsutil import external_data_files

    return bool(external_data_files(path))


def optimize_graph(src, dst, level: str = "extended", simplify: bool = True,
                   check_feeds: Mapping[str, np.ndarray] | None = None) -> GraphResult:
    """Write ``dst``: ``src`` simplified (where that helps and keeps outputs) then ORT-optimised at ``level``."""
    src, dst = Path(src), Path(dst)
    res = GraphResult(dst)
    external = has_external_data(src)
    current = src
    # Models with external data skip the in-memory simplifiers: protobuf's 2 GB
    # limit, and they would hold another full copy of the weights.
    if simplify and not external:
        simplified = dst.with_name(dst.stem + ".simplified.onnx")
        tool = _simplify(src, simplified, res)
        if tool and adopt_simplified(tool, src, simplified, check_feeds, res):
            res.tools.append(tool)
            current = simplified
    if level in ("basic", "extended"):
        ort_offline(current, dst, level, external=external)
        import onnxruntime

        res.tools.append(f"onnxruntime({level}, offline)")
        res.versions["onnxruntime"] = onnxruntime.__version__
    elif current != dst:
        shutil.copyfile(current, dst)
    return res


def adopt_simplified(tool: str, src: Path, simplified: Path, check_feeds, res: GraphResult) -> bool:
    """Whether the simplifier's graph replaces ``src``. A larger one is silently dropped: the graph before
    it goes on to ORT's optimiser, which is the normal path, so the user has nothing to act on."""
    if _node_count(simplified) > _node_count(src):
        return False
    if check_feeds is not None and not _same_outputs(src, simplified, check_feeds):
        res.warnings.append(f"{tool} changed the model's outputs; its result was not used")
        return False
    return True


def _simplify(src: Path, dst: Path, res: GraphResult) -> str | None:
    """onnxsim, else onnxoptimizer, else nothing. Returns the tool used."""
    import onnx

    try:
        import onnxsim  # optional: retool[optim]
    except ImportError:
        onnxsim = None
    if onnxsim is not None:
        try:
            model, ok = onnxsim.simplify(onnx.load(str(src)), check_n=0)
            if ok:
                onnx.save(model, str(dst))
                res.versions["onnxsim"] = getattr(onnxsim, "__version__", "?")
                return "onnxsim"
            res.warnings.append("onnxsim could not simplify the model; trying onnxoptimizer")
        except Exception as exc:  # onnxsim raises on ops it cannot fold; that is not fatal
            res.warnings.append(f"onnxsim failed ({_first_line(exc)}); trying onnxoptimizer")
    try:
        import onnxoptimizer
    except ImportError:
        if onnxsim is None:
            res.warnings.append("onnxsim/onnxoptimizer not installed (pip install -c constraints.txt '.[optim]' from the checkout); "
                                "only onnxruntime graph optimisation applied")
        return None
    try:
        model = onnxoptimizer.optimize(onnx.load(str(src)), list(_ONNXOPTIMIZER_PASSES))
        onnx.save(model, str(dst))
        res.versions["onnxoptimizer"] = getattr(onnxoptimizer, "__version__", "?")
        return "onnxoptimizer"
    except Exception as exc:
        res.warnings.append(f"onnxoptimizer failed ({_first_line(exc)}); skipped")
        return None


def ort_offline(src, dst, level: str = "extended", external: bool = False) -> None:
    """Let onnxruntime optimise ``src`` at ``level`` and save the result to ``dst``."""
    import onnxruntime as ort

    from retool.runtime import session_options

    if level == "all":
        raise ValueError("level 'all' is hardware-specific; save at most 'extended' offline")
    so = session_options(threads=1, level=level)
    so.optimized_model_filepath = str(dst)
    if external:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    Path(dst).name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])


def _node_count(path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _same_outputs(a, b, feeds, rtol: float = 1e-3, atol: float = 1e-4) -> bool:
    from retool.runtime import make_session, run_session

    try:
        ra = run_session(make_session(a, threads=1, level="disable"), feeds)
        rb = run_session(make_session(b, threads=1, level="disable"), feeds)
    except Exception:
        return False
    return len(ra) == len(rb) and all(x.shape == y.shape and np.allclose(x, y, rtol=rtol, atol=atol)
                                      for x, y in zip(ra, rb))
