"""One lowering per Caffe layer type, emitting ONNX nodes with Caffe's exact semantics.

Each handler takes the Builder and a reader.Layer, checks the layer's blobs
against the shapes the prototxt implies, emits nodes that produce the layer's
tops, and records their (static) shapes. ``HANDLERS`` maps type -> handler.
"""
from __future__ import annotations

import math

import numpy as np

from retool.converter.caffe import shapes as S
from retool.converter.caffe.builder import HANDLERS, Builder, bcast, handles, same, unsupported  # noqa: F401
from retool.converter.caffe.reader import Layer
from retool.errors import ConversionError


# -- learnable layers -----------------------------------------------------------
@handles("Convolution", "Deconvolution")
def convolution(b: Builder, L: Layer) -> None:
    cp = L.param.convolution_param
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = S.conv_geometry(cp)
    group, out_c = int(cp.group), int(cp.num_output)
    deconv = L.type == "Deconvolution"
    for x, top in zip(L.bottoms, L.tops):
        shp = b.shape(x)
        if len(shp) != 4 or cp.axis != 1:
            raise unsupported(L, f"a {len(shp)}-D input (only 2-D spatial convolution)")
        n, c, h, w = shp
        if c % group or out_c % group:
            raise ConversionError(f"layer {L.name!r} ({L.type}): channels {c} / num_output {out_c} not divisible by group {group}")
        # Convolution weights are (out, in/group, kh, kw); Deconvolution's are (in, out/group, kh, kw),
        # which is exactly ONNX ConvTranspose's layout.
        wshape = (c, out_c // group, kh, kw) if deconv else (out_c, c // group, kh, kw)
        inputs = [x, b.const(f"{L.name}_W", b.blob(L, 0, wshape, "weights"))]
        if cp.bias_term:
            inputs.append(b.const(f"{L.name}_b", b.blob(L, 1, (out_c,), "bias")))
        attrs = dict(kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw], dilations=[dh, dw], group=group)
        b.op("ConvTranspose" if deconv else "Conv", inputs, top, hint=L.name, **attrs)
        f = S.deconv_out if deconv else S.conv_out
        b.set(top, (n, out_c, f(h, kh, sh, ph, dh), f(w, kw, sw, pw, dw)), b.batched[x])


@handles("InnerProduct")
def inner_product(b: Builder, L: Layer) -> None:
    ip = L.param.inner_product_param
    x = L.bottoms[0]
    shp = b.shape(x)
    axis = S.canonical_axis(ip.axis, len(shp))
    k, n = int(np.prod(shp[axis:])), int(ip.num_output)
    w = b.blob(L, 0, (k, n) if ip.transpose else (n, k), "weights")
    w_kn = w if ip.transpose else w.T
    bias = b.blob(L, 1, (n,), "bias") if ip.bias_term else None
    if axis == 1:
        flat = x if len(shp) == 2 else b.op("Flatten", [x], hint=f"{L.name}_flatten", axis=1)
        inputs = [flat, b.const(f"{L.name}_W", w_kn)] + ([b.const(f"{L.name}_b", bias)] if bias is not None else [])
        b.op("Gemm", inputs, L.tops[0], hint=L.name)
    else:
        flat = b.op("Reshape", [x, b.ints(f"{L.name}_shape", [0] * axis + [k])], hint=f"{L.name}_reshape")
        y = b.op("MatMul", [flat, b.const(f"{L.name}_W", w_kn)], None if bias is not None else L.tops[0], hint=L.name)
        if bias is not None:
            b.op("Add", [y, b.const(f"{L.name}_b", bias)], L.tops[0], hint=f"{L.name}_bias")
    b.set(L.tops[0], tuple(shp[:axis]) + (n,), b.batched[x] and axis > 0)


def batchnorm_stats(b: Builder, L: Layer, channels: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, var, eps) with Caffe's moving-average scale factor applied (a factor of 0 means 0)."""
    bp = L.param.batch_norm_param
    if bp.HasField("use_global_stats") and not bp.use_global_stats:
        raise ConversionError(f"layer {L.name!r} (BatchNorm): use_global_stats is false, so Caffe normalises with "
                              f"each batch's own statistics at inference; set use_global_stats: true in the prototxt")
    mean = b.blob(L, 0, (channels,), "mean")
    var = b.blob(L, 1, (channels,), "variance")
    factor = float(b.blob(L, 2, (1,), "scale factor")[0])
    f = 0.0 if factor == 0 else 1.0 / factor
    return (mean * f).astype(np.float32), (var * f).astype(np.float32), float(bp.eps)


@handles("BatchNorm")
def batch_norm(b: Builder, L: Layer) -> None:
    x = L.bottoms[0]
    shp = b.shape(x)
    c = shp[1] if len(shp) > 1 else 1
    mean, var, eps = batchnorm_stats(b, L, c)
    b.op("BatchNormalization", [x, b.const(f"{L.name}_gamma", np.ones(c)), b.const(f"{L.name}_beta", np.zeros(c)),
                                b.const(f"{L.name}_mean", mean), b.const(f"{L.name}_var", var)],
         L.tops[0], hint=L.name, epsilon=eps)
    same(b, L, L.tops[0], x)


def _scale_like(b: Builder, L: Layer, param, op_type: str, has_bias: bool) -> None:
    x = L.bottoms[0]
    shp = b.shape(x)
    axis = S.canonical_axis(param.axis, len(shp))
    out = L.tops[0]
    if len(L.bottoms) > 1:  # the factor is the second bottom; num_axes is ignored
        other = L.bottoms[1]
        end = axis + len(b.shape(other))
        trailing = len(shp) - end
        factor = other if trailing == 0 else b.op(
            "Unsqueeze", [other, b.ints(f"{L.name}_axes", range(end - axis, end - axis + trailing))],
            hint=f"{L.name}_unsqueeze")
        bias_i = 0
    else:
        end = len(shp) if param.num_axes == -1 else axis + param.num_axes
        label = "scale" if op_type == "Mul" else "bias"
        pshape = tuple(shp[axis:end])
        arr = b.blob(L, 0, pshape or (1,), label).reshape(pshape)
        factor = b.const(f"{L.name}_{label}", bcast(arr, len(shp) - end))
        bias_i = 1
    y = b.op(op_type, [x, factor], None if has_bias else out, hint=L.name)
    if has_bias:
        pshape = tuple(shp[axis:end])
        arr = b.blob(L, bias_i, pshape or (1,), "bias").reshape(pshape)
        b.op("Add", [y, b.const(f"{L.name}_bias", bcast(arr, len(shp) - end))], out, hint=f"{L.name}_bias")
    same(b, L, out, x)


@handles("Scale")
def scale(b: Builder, L: Layer) -> None:
    _scale_like(b, L, L.param.scale_param, "Mul", bool(L.param.scale_param.bias_term))


@handles("Bias")
def bias(b: Builder, L: Layer) -> None:
    _scale_like(b, L, L.param.bias_param, "Add", False)


@handles("PReLU")
def prelu(b: Builder, L: Layer) -> None:
    x = L.bottoms[0]
    shp = b.shape(x)
    if L.param.prelu_param.channel_shared:
        slope = b.blob(L, 0, (1,), "slope")
    else:
        slope = bcast(b.blob(L, 0, (shp[1],), "slope"), len(shp) - 2)
    b.op("PRelu", [x, b.const(f"{L.name}_slope", slope)], L.tops[0], hint=L.name)
    same(b, L, L.tops[0], x)


# -- element-wise ---------------------------------------------------------------
@handles("ReLU")
def relu(b: Builder, L: Layer) -> None:
    slope = float(L.param.relu_param.negative_slope)
    if slope:
        b.op("LeakyRelu", [L.bottoms[0]], L.tops[0], hint=L.name, alpha=slope)
    else:
        b.op("Relu", [L.bottoms[0]], L.tops[0], hint=L.name)
    same(b, L, L.tops[0], L.bottoms[0])


_UNARY = {"Sigmoid": "Sigmoid", "TanH": "Tanh", "AbsVal": "Abs", "BNLL": "Softplus",
          "Dropout": "Identity", "Split": "Identity"}


@handles(*_UNARY)
def unary(b: Builder, L: Layer) -> None:
    for top in L.tops:  # Split: one copy per top
        b.op(_UNARY[L.type], [L.bottoms[0]], top, hint=L.name)
        same(b, L, top, L.bottoms[0])


@handles("ELU")
def elu(b: Builder, L: Layer) -> None:
    b.op("Elu", [L.bottoms[0]], L.tops[0], hint=L.name, alpha=float(L.param.elu_param.alpha))
    same(b, L, L.tops[0], L.bottoms[0])


def _affine(b: Builder, L: Layer, x: str, scale_: float, shift: float, out=None) -> str:
    """shift + scale * x, skipping identities."""
    if scale_ != 1.0:
        last = out if shift == 0.0 else None
        x = b.op("Mul", [x, b.const(f"{L.name}_scale", np.array(scale_))], last, hint=f"{L.name}_scale")
    if shift != 0.0:
        x = b.op("Add", [x, b.const(f"{L.name}_shift", np.array(shift))], out, hint=f"{L.name}_shift")
    if out is not None and x != out:
        x = b.op("Identity", [x], out, hint=L.name)
    return x


@handles("Power")
def power(b: Builder, L: Layer) -> None:
    p = L.param.power_param
    if p.power == 1.0:
        _affine(b, L, L.bottoms[0], p.scale, p.shift, L.tops[0])
    else:
        t = _affine(b, L, L.bottoms[0], p.scale, p.shift)
        b.op("Pow", [t, b.const(f"{L.name}_power", np.array(p.power))], L.tops[0], hint=L.name)
    same(b, L, L.tops[0], L.bottoms[0])


@handles("Exp")
def exp(b: Builder, L: Layer) -> None:
    p = L.param.exp_param
    ln_base = 1.0 if p.base == -1 else math.log(p.base)  # base^(shift + scale x) = e^(ln(base) (shift + scale x))
    t = _affine(b, L, L.bottoms[0], ln_base * p.scale, ln_base * p.shift)
    b.op("Exp", [t], L.tops[0], hint=L.name)
    same(b, L, L.tops[0], L.bottoms[0])


@handles("Log")
def log(b: Builder, L: Layer) -> None:
    p = L.param.log_param
    t = _affine(b, L, L.bottoms[0], p.scale, p.shift)
    if p.base == -1:
        b.op("Log", [t], L.tops[0], hint=L.name)
    else:
        y = b.op("Log", [t], hint=L.name)
        b.op("Mul", [y, b.const(f"{L.name}_invlnbase", np.array(1.0 / math.log(p.base)))], L.tops[0], hint=L.name)
    same(b, L, L.tops[0], L.bottoms[0])


@handles("Threshold")
def threshold(b: Builder, L: Layer) -> None:
    t = b.op("Greater", [L.bottoms[0], b.const(f"{L.name}_t", np.array(L.param.threshold_param.threshold))], hint=L.name)
    b.op("Cast", [t], L.tops[0], hint=f"{L.name}_cast", to=1)
    same(b, L, L.tops[0], L.bottoms[0])


@handles("Eltwise")
def eltwise(b: Builder, L: Layer) -> None:
    p = L.param.eltwise_param
    ins = list(L.bottoms)
    op_name = p.DESCRIPTOR.fields_by_name["operation"].enum_type.values_by_number[p.operation].name
    if op_name == "SUM":
        coeff = list(p.coeff)
        if coeff and len(coeff) != len(ins):
            raise ConversionError(f"layer {L.name!r} (Eltwise): {len(coeff)} coeff values for {len(ins)} bottoms")
        ins = [x if not coeff or coeff[i] == 1.0 else
               b.op("Mul", [x, b.const(f"{L.name}_coeff{i}", np.array(coeff[i]))], hint=f"{L.name}_coeff")
               for i, x in enumerate(ins)]
        b.op("Sum", ins, L.tops[0], hint=L.name)
    elif op_name == "PROD":
        y = ins[0]
        for i, x in enumerate(ins[1:], 1):
            y = b.op("Mul", [y, x], L.tops[0] if i == len(ins) - 1 else None, hint=L.name)
    else:
        b.op("Max", ins, L.tops[0], hint=L.name)
    same(b, L, L.tops[0], L.bottoms[0])


# -- spatial ------------------------------------------------------------------------
@handles("Pooling")
def pooling(b: Builder, L: Layer) -> None:
    pp = L.param.pooling_param
    x = L.bottoms[0]
    shp = b.shape(x)
    if len(shp) != 4:
        raise unsupported(L, f"a {len(shp)}-D input")
    n, c, h, w = shp
    method = pp.DESCRIPTOR.fields_by_name["pool"].enum_type.values_by_number[pp.pool].name
    if method == "STOCHASTIC":
        raise unsupported(L, "STOCHASTIC pooling")
    (kh, kw), (sh, sw), (ph, pw) = S.pool_geometry(pp, (h, w))
    ceil = pp.round_mode == 0
    oh, ow = S.pool_out(h, kh, sh, ph, ceil), S.pool_out(w, kw, sw, pw, ceil)
    top = L.tops[0]
    if pp.global_pooling:
        b.op("GlobalMaxPool" if method == "MAX" else "GlobalAveragePool", [x], top, hint=L.name)
    elif method == "MAX":
        # Padding is ignored by max pooling; the end pad makes ONNX's floor rounding land on Caffe's count.
        eh, ew = (max(0, (o - 1) * s + k - size - p) for o, s, k, size, p in ((oh, sh, kh, h, ph), (ow, sw, kw, w, pw)))
        b.op("MaxPool", [x], top, hint=L.name, kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, eh, ew])
    else:
        # Caffe divides by the window clipped at H+pad: pad explicitly with zeros (counted), then let
        # ONNX add any further end padding uncounted.
        src = x
        if ph or pw:
            src = b.op("Pad", [x, b.ints(f"{L.name}_pads", [0, 0, ph, pw, 0, 0, ph, pw])], hint=f"{L.name}_pad")
        eh, ew = (max(0, (o - 1) * s + k - size - 2 * p) for o, s, k, size, p in ((oh, sh, kh, h, ph), (ow, sw, kw, w, pw)))
        b.op("AveragePool", [src], top, hint=L.name, kernel_shape=[kh, kw], strides=[sh, sw],
             pads=[0, 0, eh, ew], count_include_pad=0)
    b.set(top, (n, c, oh, ow), b.batched[x])


@handles("LRN")
def lrn(b: Builder, L: Layer) -> None:
    p = L.param.lrn_param
    x = L.bottoms[0]
    size = int(p.local_size)
    if size % 2 == 0:
        raise ConversionError(f"layer {L.name!r} (LRN): local_size must be odd, got {size}")
    if p.norm_region == 0:  # ACROSS_CHANNELS
        b.op("LRN", [x], L.tops[0], hint=L.name, size=size, alpha=float(p.alpha), beta=float(p.beta), bias=float(p.k))
    else:
        # Caffe's WITHIN_CHANNEL: x * (1 + alpha * avgpool(x^2))^-beta (k is not used), pad (size-1)/2.
        pad = (size - 1) // 2
        sq = b.op("Mul", [x, x], hint=f"{L.name}_sq")
        avg = b.op("AveragePool", [sq], hint=f"{L.name}_avg", kernel_shape=[size, size], strides=[1, 1],
                   pads=[pad] * 4, count_include_pad=1)
        den = _affine(b, L, avg, float(p.alpha), 1.0)
        powd = b.op("Pow", [den, b.const(f"{L.name}_negbeta", np.array(-p.beta))], hint=f"{L.name}_pow")
        b.op("Mul", [x, powd], L.tops[0], hint=L.name)
    same(b, L, L.tops[0], x)


# -- shape and routing ----------------------------------------------------------------
@handles("Concat")
def concat(b: Builder, L: Layer) -> None:
    p = L.param.concat_param
    shp = b.shape(L.bottoms[0])
    axis = S.canonical_axis(p.concat_dim if p.HasField("concat_dim") else p.axis, len(shp))
    b.op("Concat", list(L.bottoms), L.tops[0], hint=L.name, axis=axis)
    out = list(shp)
    out[axis] = sum(b.shape(t)[axis] for t in L.bottoms)
    b.set(L.tops[0], out, b.batched[L.bottoms[0]])


@handles("Slice")
def slice_(b: Builder, L: Layer) -> None:
    p = L.param.slice_param
    x = L.bottoms[0]
    shp = b.shape(x)
    axis = S.canonical_axis(p.slice_dim if p.HasField("slice_dim") else p.axis, len(shp))
    total = shp[axis]
    if len(p.slice_point):
        points = [0] + [int(v) for v in p.slice_point] + [total]
        sizes = [points[i + 1] - points[i] for i in range(len(points) - 1)]
    else:
        if total % len(L.tops):
            raise ConversionError(f"layer {L.name!r} (Slice): axis size {total} is not divisible into {len(L.tops)} tops")
        sizes = [total // len(L.tops)] * len(L.tops)
    if len(sizes) != len(L.tops) or any(s <= 0 for s in sizes):
        raise ConversionError(f"layer {L.name!r} (Slice): slice points {list(p.slice_point)} do not fit "
                              f"{len(L.tops)} tops on an axis of size {total}")
    if len(L.tops) == 1:
        b.op("Identity", [x], L.tops[0], hint=L.name)
    else:
        b.op("Split", [x, b.ints(f"{L.name}_split", sizes)], list(L.tops), hint=L.name, axis=axis)
    for top, size in zip(L.tops, sizes):
        out = list(shp)
        out[axis] = size
        b.set(top, out, b.batched[x])


@handles("Crop")
def crop(b: Builder, L: Layer) -> None:
    p = L.param.crop_param
    x, ref = L.bottoms[:2]
    shp, rshp = b.shape(x), b.shape(ref)
    axis = S.canonical_axis(p.axis, len(shp))
    offsets = [int(v) for v in p.offset]
    axes = list(range(axis, len(shp)))
    if len(offsets) not in (0, 1, len(axes)):
        raise ConversionError(f"layer {L.name!r} (Crop): {len(offsets)} offsets for {len(axes)} cropped axes")
    offs = [offsets[0] if len(offsets) == 1 else (offsets[i] if offsets else 0) for i in range(len(axes))]
    for a, o in zip(axes, offs):
        if o + rshp[a] > shp[a]:
            raise ConversionError(f"layer {L.name!r} (Crop): offset {o} + size {rshp[a]} exceeds axis {a} of size {shp[a]}")
    b.op("Slice", [x, b.ints(f"{L.name}_starts", offs), b.ints(f"{L.name}_ends", [o + rshp[a] for a, o in zip(axes, offs)]),
                   b.ints(f"{L.name}_axes", axes)], L.tops[0], hint=L.name)
    out = list(shp[:axis]) + [rshp[a] for a in axes]
    b.set(L.tops[0], out, b.batched[x])


@handles("Flatten")
def flatten(b: Builder, L: Layer) -> None:
    p = L.param.flatten_param
    x = L.bottoms[0]
    shp = b.shape(x)
    axis, end = S.canonical_axis(p.axis, len(shp)), S.canonical_axis(p.end_axis, len(shp))
    out = list(shp[:axis]) + [int(np.prod(shp[axis:end + 1]))] + list(shp[end + 1:])
    b.op("Reshape", [x, b.ints(f"{L.name}_shape", [0] * axis + [-1] + list(shp[end + 1:]))], L.tops[0], hint=L.name)
    b.set(L.tops[0], out, b.batched[x])


@handles("Reshape")
def reshape(b: Builder, L: Layer) -> None:
    p = L.param.reshape_param
    x = L.bottoms[0]
    shp = b.shape(x)
    out = S.reshape_shape(shp, p)
    start = S.canonical_axis(p.axis, len(shp) + 1) if p.axis < 0 else p.axis
    end = len(shp) if p.num_axes == -1 else start + p.num_axes
    spec = [int(d) for d in p.shape.dim]
    # 0 copies the same index in ONNX as in Caffe here, so leading dims (the batch) stay dynamic.
    onnx_shape = [0] * start + spec + list(shp[end:])
    if int(np.prod(out)) != int(np.prod(shp)):
        raise ConversionError(f"layer {L.name!r} (Reshape): cannot reshape {shp} to {out}")
    b.op("Reshape", [x, b.ints(f"{L.name}_shape", onnx_shape)], L.tops[0], hint=L.name)
    b.set(L.tops[0], out, b.batched[x] and (start > 0 or (spec and spec[0] in (0, -1))))


@handles("Softmax")
def softmax(b: Builder, L: Layer) -> None:
    x = L.bottoms[0]
    axis = S.canonical_axis(L.param.softmax_param.axis, len(b.shape(x)))
    b.op("Softmax", [x], L.tops[0], hint=L.name, axis=axis)
    same(b, L, L.tops[0], x)


@handles("Silence")
def silence(b: Builder, L: Layer) -> None:
    pass


# -- SSD fork ------------------------------------------------------------------------------
@handles("Permute")
def permute(b: Builder, L: Layer) -> None:
    x = L.bottoms[0]
    shp = b.shape(x)
    order = [int(o) for o in L.param.permute_param.order]
    order += [a for a in range(len(shp)) if a not in order]
    if sorted(order) != list(range(len(shp))):
        raise ConversionError(f"layer {L.name!r} (Permute): order {order} is not a permutation of {len(shp)} axes")
    b.op("Transpose", [x], L.tops[0], hint=L.name, perm=order)
    b.set(L.tops[0], [shp[a] for a in order], b.batched[x] and order[0] == 0)


@handles("Normalize")
def normalize(b: Builder, L: Layer) -> None:
    p = L.param.norm_param
    x = L.bottoms[0]
    shp = b.shape(x)
    axes = list(range(1, len(shp))) if p.across_spatial else [1]
    ss = b.reduce("ReduceSumSquare", x, axes, f"{L.name}_sumsq")
    norm = b.op("Sqrt", [b.op("Add", [ss, b.const(f"{L.name}_eps", np.array(p.eps))], hint=f"{L.name}_eps")],
                hint=f"{L.name}_norm")
    y = b.op("Div", [x, norm], hint=L.name)
    scale_ = b.blob(L, 0, (1,), "scale") if p.channel_shared else bcast(b.blob(L, 0, (shp[1],), "scale"), len(shp) - 2)
    b.op("Mul", [y, b.const(f"{L.name}_scale", scale_)], L.tops[0], hint=f"{L.name}_scale")
    same(b, L, L.tops[0], x)


@handles("PriorBox")
def prior_box(b: Builder, L: Layer) -> None:
    from onnx import numpy_helper

    if len(L.bottoms) < 2:
        raise ConversionError(f"layer {L.name!r} (PriorBox): needs two bottoms (feature map, image)")
    fshape, ishape = b.shape(L.bottoms[0]), b.shape(L.bottoms[1])
    boxes = S.prior_boxes(L.param.prior_box_param, tuple(fshape[2:4]), tuple(ishape[2:4]))
    b.op("Constant", [], L.tops[0], hint=L.name, value=numpy_helper.from_array(boxes, L.tops[0] + "_value"))
    b.set(L.tops[0], boxes.shape, batched=False)


# DetectionOutput lives in its own module; importing it registers the handler.
from retool.converter.caffe import detection  # noqa: E402,F401
