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


def opencv_divergences(layers) -> list[str]:
    """Layers where OpenCV's dnn (4.x) does not follow Caffe, so it cannot serve as the reference.

    Measured against Caffe's definitions: OpenCV ignores these parameters or lacks these layers.
    """
    out = []
    for L in layers:
        p = L.param
        if L.type in ("Threshold", "Bias"):
            out.append(f"layer {L.name!r}: OpenCV has no {L.type} layer")
        elif L.type == "InnerProduct" and p.inner_product_param.transpose:
            out.append(f"layer {L.name!r}: OpenCV ignores InnerProduct transpose: true")
        elif L.type == "LRN" and p.lrn_param.norm_region == 0 and p.lrn_param.k != 1.0:
            out.append(f"layer {L.name!r}: OpenCV ignores LRN k != 1")
        elif L.type == "Pooling" and p.pooling_param.round_mode == 1:
            out.append(f"layer {L.name!r}: OpenCV ignores Pooling round_mode: FLOOR")
        elif L.type == "Log" and (p.log_param.base != -1 or p.log_param.scale != 1 or p.log_param.shift != 0):
            out.append(f"layer {L.name!r}: OpenCV ignores Log base/scale/shift")
        elif L.type == "PriorBox" and not p.prior_box_param.HasField("clip"):
            out.append(f"layer {L.name!r}: OpenCV's PriorBox clip defaults to true, Caffe SSD's to false "
                       f"(set clip explicitly)")
        elif L.type == "DetectionOutput":
            q = p.detection_output_param
            if q.keep_top_k < 0:
                out.append(f"layer {L.name!r}: OpenCV's DetectionOutput fails with keep_top_k -1")
            if q.code_type == 3:
                out.append(f"layer {L.name!r}: OpenCV has no DetectionOutput code_type CORNER_SIZE")
            if q.variance_encoded_in_target:
                out.append(f"layer {L.name!r}: OpenCV's DetectionOutput wants a prior blob without variances "
                           f"for variance_encoded_in_target")
    return out
