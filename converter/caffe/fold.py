"""--fold-batchnorm: fold BatchNorm (+ Scale) into the convolution that feeds them."""
from __future__ import annotations

import dataclasses

import numpy as np

from retool.converter.caffe.builder import Builder
from retool.converter.caffe.layers import batchnorm_stats
from retool.converter.caffe.reader import Layer


def fold_batchnorm(layers: list[Layer], protected: set[str], weights_label: str) -> tuple[list[Layer], int]:
    """Returns the new layer list and how many BatchNorm layers were folded.

    A BatchNorm folds only when it is the sole reader of a Convolution's output and
    that output is not a net output; a Scale (axis 1, one axis) right after it folds too.
    """
    readers: dict[str, list[int]] = {}
    for i, L in enumerate(layers):
        for bt in L.bottoms:
            readers.setdefault(bt, []).append(i)

    def sole_reader(tensor: str, types: tuple[str, ...]):
        r = readers.get(tensor, [])
        if tensor in protected or len(r) != 1 or layers[r[0]].type not in types:
            return None
        return r[0]

    checker = Builder(13, weights_label)
    dropped: set[int] = set()
    folded = 0
    layers = list(layers)
    for i, conv in enumerate(list(layers)):
        if conv.type != "Convolution" or len(conv.tops) != 1:
            continue
        bn_i = sole_reader(conv.tops[0], ("BatchNorm",))
        if bn_i is None:
            continue
        cp = conv.param.convolution_param
        out_c = int(cp.num_output)
        mean, var, eps = batchnorm_stats(checker, layers[bn_i], out_c)
        a = 1.0 / np.sqrt(var.astype(np.float64) + eps)
        gamma = np.ones(out_c)
        beta = np.zeros(out_c)
        last = bn_i
        sc_i = sole_reader(layers[bn_i].tops[0], ("Scale",))
        if sc_i is not None:
            sc = layers[sc_i]
            sp = sc.param.scale_param
            if len(sc.bottoms) == 1 and sp.axis == 1 and sp.num_axes == 1:
                gamma = checker.blob(sc, 0, (out_c,), "scale").astype(np.float64)
                if sp.bias_term:
                    beta = checker.blob(sc, 1, (out_c,), "bias").astype(np.float64)
                last = sc_i
        w = conv.blobs[0].astype(np.float64)
        bias = conv.blobs[1].reshape(-1).astype(np.float64) if cp.bias_term and len(conv.blobs) > 1 else np.zeros(out_c)
        if w.size % out_c or bias.size != out_c:
            continue  # let the normal path report the mismatch
        mult = a * gamma
        new_w = (w.reshape(out_c, -1) * mult[:, None]).reshape(w.shape).astype(np.float32)
        new_b = ((bias - mean) * mult + beta).astype(np.float32)
        param = type(conv.param)()
        param.CopyFrom(conv.param)  # the unfolded net stays intact for the reference
        param.convolution_param.bias_term = True
        layers[i] = dataclasses.replace(conv, param=param, blobs=[new_w, new_b], tops=layers[last].tops,
                                        blob_tops=layers[last].blob_tops)
        dropped.update({bn_i, last})
        folded += 1
    return [L for i, L in enumerate(layers) if i not in dropped], folded
