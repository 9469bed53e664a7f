"""A small NumPy Caffe runtime, written from Caffe's layer definitions (not from our ONNX lowering).

It is the parity reference for nets OpenCV does not run faithfully (layers it lacks,
parameters it ignores, double_data blobs). Computes in float64 and returns float32.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from retool.converter.caffe import shapes as S
from retool.errors import ConversionError


def _windows(x, kh, kw, sh, sw, dh=1, dw=1):
    """(N, C, OH, OW, kh, kw) views of an already padded x."""
    from numpy.lib.stride_tricks import sliding_window_view

    v = sliding_window_view(x, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    return v[:, :, ::sh, ::sw, ::dh, ::dw]


def conv(x, w, b, k, s, p, d, group):
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))
    win = _windows(xp, k[0], k[1], s[0], s[1], d[0], d[1])
    oh, ow = win.shape[2], win.shape[3]
    o = w.shape[0]
    win = win.reshape(n, group, c // group, oh, ow, k[0], k[1])
    wg = w.reshape(group, o // group, c // group, k[0], k[1])
    y = np.einsum("ngchwij,gocij->ngohw", win, wg, optimize=True).reshape(n, o, oh, ow)
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def deconv(x, w, b, k, s, p, d, group):
    n, c, h, wd = x.shape
    og = w.shape[1]
    full = np.zeros((n, og * group, (h - 1) * s[0] + d[0] * (k[0] - 1) + 1, (wd - 1) * s[1] + d[1] * (k[1] - 1) + 1))
    xg = x.reshape(n, group, c // group, h, wd)
    wg = w.reshape(group, c // group, og, k[0], k[1])
    for i in range(k[0]):
        for j in range(k[1]):
            contrib = np.einsum("ngchw,gco->ngohw", xg, wg[:, :, :, i, j]).reshape(n, og * group, h, wd)
            full[:, :, i * d[0]: i * d[0] + (h - 1) * s[0] + 1: s[0], j * d[1]: j * d[1] + (wd - 1) * s[1] + 1: s[1]] += contrib
    y = full[:, :, p[0]: full.shape[2] - p[0], p[1]: full.shape[3] - p[1]]
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def pool(x, method, k, s, p, oh, ow):
    """Caffe's PoolingLayer loops: windows clipped to the input; AVE divides by the window clipped at H+pad."""
    n, c, h, w = x.shape
    y = np.empty((n, c, oh, ow))
    for i in range(oh):
        hs = i * s[0] - p[0]
        he = min(hs + k[0], h + p[0])
        for j in range(ow):
            ws = j * s[1] - p[1]
            we = min(ws + k[1], w + p[1])
            size = (he - hs) * (we - ws)
            win = x[:, :, max(hs, 0):min(he, h), max(ws, 0):min(we, w)]
            y[:, :, i, j] = win.max(axis=(2, 3)) if method == "MAX" else win.sum(axis=(2, 3)) / size
    return y


def _enum(msg, field, value) -> str:
    return msg.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[value].name


def _bshape(arr, shape, axis):
    return arr.reshape((1,) * axis + tuple(arr.shape) + (1,) * (len(shape) - axis - arr.ndim))


def forward_layer(L, ins: list[np.ndarray]) -> list[np.ndarray]:
    t, p = L.type, L.param
    blobs = [np.asarray(bl, dtype=np.float64) for bl in L.blobs]
    x = ins[0] if ins else None
    if t in ("Convolution", "Deconvolution"):
        cp = p.convolution_param
        k, s, pad, d = S.conv_geometry(cp)
        b = blobs[1].reshape(-1) if cp.bias_term else None
        outs = []
        for xi in ins:
            c = xi.shape[1]
            g = int(cp.group)
            if t == "Convolution":
                w = blobs[0].reshape(int(cp.num_output), c // g, k[0], k[1])
                outs.append(conv(xi, w, b, k, s, pad, d, g))
            else:
                w = blobs[0].reshape(c, int(cp.num_output) // g, k[0], k[1])
                outs.append(deconv(xi, w, b, k, s, pad, d, g))
        return outs
    if t == "InnerProduct":
        ip = p.inner_product_param
        axis = S.canonical_axis(ip.axis, x.ndim)
        flat = x.reshape(x.shape[:axis] + (-1,))
        w = blobs[0].reshape(flat.shape[-1], -1) if ip.transpose else blobs[0].reshape(-1, flat.shape[-1]).T
        y = flat @ w
        return [y + blobs[1].reshape(-1) if ip.bias_term else y]
    if t == "Pooling":
        pp = p.pooling_param
        k, s, pad = S.pool_geometry(pp, x.shape[2:])
        ceil = pp.round_mode == 0
        oh, ow = S.pool_out(x.shape[2], k[0], s[0], pad[0], ceil), S.pool_out(x.shape[3], k[1], s[1], pad[1], ceil)
        return [pool(x, _enum(pp, "pool", pp.pool), k, s, pad, oh, ow)]
    if t == "BatchNorm":
        f = blobs[2].reshape(-1)[0]
        f = 0.0 if f == 0 else 1.0 / f
        mean, var = blobs[0].reshape(-1) * f, blobs[1].reshape(-1) * f
        return [(x - _bshape(mean, x.shape, 1)) / np.sqrt(_bshape(var, x.shape, 1) + p.batch_norm_param.eps)]
    if t in ("Scale", "Bias"):
        sp = p.scale_param if t == "Scale" else p.bias_param
        axis = S.canonical_axis(sp.axis, x.ndim)
        if len(ins) > 1:
            pshape, factor, rest = ins[1].shape, ins[1], blobs
        else:
            end = x.ndim if sp.num_axes == -1 else axis + sp.num_axes
            pshape, factor, rest = x.shape[axis:end], blobs[0], blobs[1:]
        factor = _bshape(factor.reshape(pshape), x.shape, axis)
        y = x * factor if t == "Scale" else x + factor
        if t == "Scale" and sp.bias_term:
            y = y + _bshape(rest[0].reshape(pshape), x.shape, axis)
        return [y]
    if t == "PReLU":
        slope = blobs[0].reshape(-1)
        slope = slope[0] if p.prelu_param.channel_shared else _bshape(slope, x.shape, 1)
        return [np.maximum(x, 0) + slope * np.minimum(x, 0)]
    if t == "ReLU":
        return [np.maximum(x, 0) + p.relu_param.negative_slope * np.minimum(x, 0)]
    if t == "ELU":
        return [np.where(x > 0, x, p.elu_param.alpha * (np.exp(np.minimum(x, 0)) - 1))]
    if t == "Sigmoid":
        return [1 / (1 + np.exp(-x))]
    if t == "TanH":
        return [np.tanh(x)]
    if t == "AbsVal":
        return [np.abs(x)]
    if t == "BNLL":
        return [np.where(x > 0, x + np.log1p(np.exp(-np.abs(x))), np.log1p(np.exp(np.minimum(x, 0))))]
    if t == "Power":
        q = p.power_param
        return [np.power(q.shift + q.scale * x, q.power)]
    if t == "Exp":
        q = p.exp_param
        base = math.e if q.base == -1 else q.base
        return [np.power(base, q.shift + q.scale * x)]
    if t == "Log":
        q = p.log_param
        y = np.log(q.shift + q.scale * x)
        return [y if q.base == -1 else y / math.log(q.base)]
    if t == "Threshold":
        return [(x > p.threshold_param.threshold).astype(np.float64)]
    if t in ("Dropout", "Split"):
        return [x] * len(L.tops)
    if t == "Silence":
        return []
    if t == "Eltwise":
        ep = p.eltwise_param
        op = _enum(ep, "operation", ep.operation)
        if op == "SUM":
            coeff = list(ep.coeff) or [1.0] * len(ins)
            return [sum(c * a for c, a in zip(coeff, ins))]
        if op == "PROD":
            return [np.prod(np.stack(ins), axis=0)]
        return [np.max(np.stack(ins), axis=0)]
    if t == "LRN":
        q = p.lrn_param
        n, pad = int(q.local_size), (int(q.local_size) - 1) // 2
        sq = x * x
        if q.norm_region == 0:
            padded = np.pad(sq, ((0, 0), (pad, pad), (0, 0), (0, 0)))
            acc = sum(padded[:, i:i + x.shape[1]] for i in range(n))
            return [x * np.power(q.k + q.alpha / n * acc, -q.beta)]
        padded = np.pad(sq, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        acc = sum(padded[:, :, i:i + x.shape[2], j:j + x.shape[3]] for i in range(n) for j in range(n))
        return [x * np.power(1 + q.alpha * acc / (n * n), -q.beta)]
    if t == "Concat":
        cp = p.concat_param
        return [np.concatenate(ins, axis=S.canonical_axis(cp.concat_dim if cp.HasField("concat_dim") else cp.axis, x.ndim))]
    if t == "Slice":
        sp = p.slice_param
        axis = S.canonical_axis(sp.slice_dim if sp.HasField("slice_dim") else sp.axis, x.ndim)
        points = list(sp.slice_point) or [x.shape[axis] // len(L.tops) * i for i in range(1, len(L.tops))]
        return np.split(x, points, axis=axis)
    if t == "Crop":
        cp = p.crop_param
        axis = S.canonical_axis(cp.axis, x.ndim)
        offs = list(cp.offset)
        idx = [slice(None)] * axis
        for i, a in enumerate(range(axis, x.ndim)):
            o = 0 if not offs else (offs[0] if len(offs) == 1 else offs[i])
            idx.append(slice(o, o + ins[1].shape[a]))
        return [x[tuple(idx)]]
    if t == "Flatten":
        fp = p.flatten_param
        a, e = S.canonical_axis(fp.axis, x.ndim), S.canonical_axis(fp.end_axis, x.ndim)
        return [x.reshape(x.shape[:a] + (-1,) + x.shape[e + 1:])]
    if t == "Reshape":
        return [x.reshape(S.reshape_shape(x.shape, p.reshape_param))]
    if t == "Softmax":
        axis = S.canonical_axis(p.softmax_param.axis, x.ndim)
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return [e / e.sum(axis=axis, keepdims=True)]
    if t == "Permute":
        order = [int(o) for o in p.permute_param.order]
        return [np.transpose(x, order + [a for a in range(x.ndim) if a not in order])]
    if t == "Normalize":
        q = p.norm_param
        axes = tuple(range(1, x.ndim)) if q.across_spatial else (1,)
        y = x / np.sqrt((x * x).sum(axis=axes, keepdims=True) + q.eps)
        sc = blobs[0].reshape(-1)
        return [y * (sc[0] if q.channel_shared else _bshape(sc, x.shape, 1))]
    if t == "PriorBox":
        return [S.prior_boxes(p.prior_box_param, ins[0].shape[2:4], ins[1].shape[2:4]).astype(np.float64)]
    if t == "DetectionOutput":
        from retool.converter.caffe.detection import forward_numpy

        return [forward_numpy(L, ins)]
    raise ConversionError(f"layer {L.name!r} ({t}): the NumPy reference has no implementation")


class NumpyReference:
    def __init__(self, net, output_tensors):
        self.net = net
        self.outputs = list(output_tensors)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        env = {k: np.asarray(v, dtype=np.float64) for k, v in feeds.items()}
        for L in self.net.layers:
            outs = forward_layer(L, [env[b] for b in L.bottoms])
            env.update(zip(L.tops, outs))
        return [env[t].astype(np.float32) for t in self.outputs]
