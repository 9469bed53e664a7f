"""Structural checks: the ONNX checker, shape inference, and loading in onnxruntime."""
from __future__ import annotations

import tempfile
from pathlib import Path

from retool.types import CheckResult


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return (lines[0] if lines else text)[:400]
