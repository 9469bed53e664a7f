"""Structural checks: the ONNX checker, shape inference, and loading in onnxruntime."""
from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

from retool.errors import first_line
from retool.types import CheckResult

#: one-line error text; this module keeps its own length limit
_first_line = partial(first_line, limit=400)


def structural_checks(path) -> list[CheckResult]:
    """Checker and shape inference run by path, so models over 2 GB work too."""
    import onnx

    p = Path(path)
    checks = []
    try:
        onnx.checker.check_model(str(p), full_check=False)
        checks.append(CheckResult("onnx.checker", True))
    except Exception as exc:
        checks.append(CheckResult("onnx.checker", False, message=_first_line(exc)))
    try:
        with tempfile.TemporaryDirectory() as d:
            # strict shape inference catches graphs ORT would reject with a worse message
            onnx.shape_inference.infer_shapes_path(str(p), str(Path(d) / "inferred.onnx"), strict_mode=True)
        checks.append(CheckResult("onnx.shape_inference", True))
    except Exception as exc:
        checks.append(CheckResult("onnx.shape_inference", False, message=_first_line(exc)))
    return checks


def ort_load_check(path) -> tuple[CheckResult, object | None]:
    from retool.runtime import make_session

    try:
        sess = make_session(path)
        return CheckResult("onnxruntime.load", True), sess
    except Exception as exc:
        return CheckResult("onnxruntime.load", False, message=_first_line(exc)), None
