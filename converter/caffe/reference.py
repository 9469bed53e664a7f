"""OpenCV's dnn module as the independent Caffe runtime for parity checks."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from retool.errors import ConversionError


class OpenCVReference:
    """Runs the original prototxt + caffemodel with cv2.dnn (fusion off, so in-place layers stay exact)."""

    def __init__(self, prototxt: Path, caffemodel: Path | None, outputs: Sequence[tuple[str, int]]):
        from retool.deps import require

        cv2 = require("cv2", "caffe", "check Caffe conversions against OpenCV", package="opencv-python-headless")
        try:
            net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel)) if caffemodel else \
                cv2.dnn.readNetFromCaffe(str(prototxt))
        except cv2.error as exc:
            raise ConversionError(f"{prototxt}: OpenCV cannot load this net for the parity check "
                                  f"({_cv_msg(exc)}); re-run with --no-verify to skip it") from None
        net.enableFusion(False)
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        self.cv2 = cv2
        self.net = net
        self.prototxt = prototxt
        self.outputs = list(outputs)
        self.version = cv2.__version__

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        for name, arr in feeds.items():
            self.net.setInput(np.ascontiguousarray(arr, dtype=np.float32), name)
        layers = list(dict.fromkeys(layer for layer, _ in self.outputs))
        try:
            got = self.net.forwardAndRetrieve(layers)
        except self.cv2.error as exc:
            raise ConversionError(f"{self.prototxt}: OpenCV failed to run this net for the parity check "
                                  f"({_cv_msg(exc)}); re-run with --no-verify to skip it") from None
        by_layer = dict(zip(layers, got))
        return [np.asarray(by_layer[layer][i]) for layer, i in self.outputs]


def _cv_msg(exc) -> str:
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    for l in lines:
        if "error:" in l:
            return l.split("error:", 1)[1].strip()[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]
