"""Caffe's shape arithmetic, computed here rather than by ONNX shape inference
(which gets ceil-mode pooling wrong before opset 22)."""
from __future__ import annotations

import math

import numpy as np


def conv_out(size: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


def deconv_out(size: int, k: int, s: int, p: int, d: int = 1) -> int:
    return s * (size - 1) + d * (k - 1) + 1 - 2 * p


def pool_out(size: int, k: int, s: int, p: int, ceil: bool = True) -> int:
    """Caffe PoolingLayer::Reshape: ceil rounding, then drop a window that starts in the padding."""
    span = size + 2 * p - k
    out = (int(math.ceil(span / s)) if ceil else span // s) + 1
    if p > 0 and (out - 1) * s >= size + p:
        out -= 1
    return out


def conv_geometry(cp) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(kernel, stride, pad, dilation) as (h, w) pairs from a ConvolutionParameter."""
    def pick(rep, h_field, w_field, default):
        if cp.HasField(h_field) or cp.HasField(w_field):
            return int(getattr(cp, h_field)), int(getattr(cp, w_field))
        vals = list(rep) or [default]
        return (int(vals[0]), int(vals[-1])) if len(vals) <= 2 else (int(vals[0]), int(vals[1]))

    kernel = pick(cp.kernel_size, "kernel_h", "kernel_w", 1)
    stride = pick(cp.stride, "stride_h", "stride_w", 1)
    pad = pick(cp.pad, "pad_h", "pad_w", 0)
    dil = tuple(int(v) for v in (list(cp.dilation) or [1]))
    dilation = (dil[0], dil[-1])
    return kernel, stride, pad, dilation


def pool_geometry(pp, in_hw: tuple[int, int]):
    """(kernel, stride, pad) as (h, w) pairs from a PoolingParameter; global pooling covers the input."""
    if pp.global_pooling:
        return tuple(in_hw), (1, 1), (0, 0)
    k = (pp.kernel_h, pp.kernel_w) if pp.HasField("kernel_h") else (pp.kernel_size, pp.kernel_size)
    s = (pp.stride_h, pp.stride_w) if pp.HasField("stride_h") else (pp.stride, pp.stride)
    p = (pp.pad_h, pp.pad_w) if (pp.HasField("pad_h") or pp.HasField("pad_w")) else (pp.pad, pp.pad)
    return tuple(map(int, k)), tuple(map(int, s)), tuple(map(int, p))


def canonical_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def reshape_shape(in_shape: tuple, rp) -> list[int]:
    """Caffe ReshapeLayer's target shape: 0 copies a dimension, -1 infers one, within axis/num_axes."""
    rank = len(in_shape)
    start = canonical_axis(rp.axis, rank + 1) if rp.axis < 0 else rp.axis
    end = rank if rp.num_axes == -1 else start + rp.num_axes
    spec = [int(d) for d in rp.shape.dim]
    out = list(in_shape[:start])
    for i, d in enumerate(spec):
        out.append(int(in_shape[start + i]) if d == 0 else d)
    out += list(in_shape[end:])
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1]))
        out[out.index(-1)] = int(np.prod(in_shape)) // max(known, 1)
    return out


def prior_boxes(pp, layer_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """SSD PriorBoxLayer output (1, 2, H*W*num_priors*4): boxes, then variances."""
    lh, lw = layer_hw
    img_h = pp.img_h if pp.HasField("img_h") else (pp.img_size if pp.HasField("img_size") else image_hw[0])
    img_w = pp.img_w if pp.HasField("img_w") else (pp.img_size if pp.HasField("img_size") else image_hw[1])
    if pp.HasField("step_h") or pp.HasField("step_w"):
        step_h, step_w = float(pp.step_h), float(pp.step_w)
    elif pp.HasField("step"):
        step_h = step_w = float(pp.step)
    else:
        step_h, step_w = img_h / lh, img_w / lw
    ratios = [1.0]
    for ar in pp.aspect_ratio:
        if any(abs(ar - r) < 1e-6 for r in ratios):
            continue
        ratios.append(float(ar))
        if pp.flip:
            ratios.append(1.0 / ar)
    sizes = []  # (width, height) per prior, in SSD's order
    for i, mn in enumerate(pp.min_size):
        sizes.append((mn, mn))
        if len(pp.max_size):
            side = math.sqrt(mn * pp.max_size[i])
            sizes.append((side, side))
        for ar in ratios:
            if abs(ar - 1.0) < 1e-6:
                continue
            sizes.append((mn * math.sqrt(ar), mn / math.sqrt(ar)))
    wh = np.array(sizes, dtype=np.float64)  # (P, 2)
    cy, cx = np.meshgrid((np.arange(lh) + pp.offset) * step_h, (np.arange(lw) + pp.offset) * step_w, indexing="ij")
    cx = cx[:, :, None]
    cy = cy[:, :, None]
    boxes = np.stack([(cx - wh[:, 0] / 2) / img_w, (cy - wh[:, 1] / 2) / img_h,
                      (cx + wh[:, 0] / 2) / img_w, (cy + wh[:, 1] / 2) / img_h], axis=-1).reshape(-1)
    if pp.clip:
        boxes = np.clip(boxes, 0.0, 1.0)
    var = list(pp.variance) or [0.1]
    variances = np.tile(np.array(var if len(var) == 4 else var[:1] * 4, dtype=np.float64), boxes.size // 4)
    return np.stack([boxes, variances]).astype(np.float32)[None]
