"""GPTQ for MatMulNBits int4 (symmetric, block 32 along K), written into onnxruntime's own layout.

Why not ``GPTQWeightOnlyQuantConfig``: in onnxruntime 1.32 its error compensation is a no-op. With
weights stored (K, N) it takes ``Hinv = cholesky(inv(H)).T`` (upper triangular) and propagates each
row's error through ``Hinv[i:, i]``, a column of that upper matrix, which is zero below the diagonal;
the block-to-block update ``Hinv[i2:, i1:i2]`` is zero as well. Measured: its asymmetric weights are
bit-identical to round-to-nearest's, and its symmetric result re-quantizes the fake-quantized weights
on another grid (scale 2*max/15 instead of max/8), which loses accuracy (docs/huggingface.md).

Here: the Hessian of each weight MatMul's input, ``H = 2/n * X^T X``, from the calibration feeds; then
GPTQ (Frantar et al. 2022) row by row in K, 128 rows per lazy batch, each group of 32 rows getting its
scale from the already-updated rows (ORT's symmetric rule: the element of largest magnitude maps to -8).
The ints and scales replace those of the round-to-nearest MatMulNBits, whose node and shapes stay.
"""
from __future__ import annotations

import numpy as np

#: GPTQ's dampening, as a fraction of the mean Hessian diagonal (the paper's and ORT's default)
PERCDAMP = 0.01
#: rows handled per lazy batch update (a multiple of the int4 block)
LAZY_ROWS = 128
#: Hessians held at once; more activations mean another pass over the calibration feeds
HESSIAN_BYTES = 1 << 30


def block_scales(w: np.ndarray) -> np.ndarray:
    """ORT's symmetric int4 scale per column of one block (rows x N): the signed value of largest
    magnitude / -8, so that value is exactly -8."""
    idx = np.abs(w).argmax(0)
    s = w[idx, np.arange(w.shape[1])] / -8.0
    s[s == 0] = 1.0
    return s


def gptq(w: np.ndarray, h: np.ndarray, block: int = 32, percdamp: float = PERCDAMP):
    """Quantize ``w`` (K, N) with Hessian ``h`` (K, K): returns ints q (K, N) in [-8, 7] and scales
    (K/block, N), so that w ~ q * scales[k // block]."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    k, n = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h[np.diag_indices(k)] += percdamp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: inv(h) = u.T @ u
    q = np.zeros((k, n), np.int8)
    scales = np.zeros(((k + block - 1) // block, n), np.float64)
    lazy = max(block, LAZY_ROWS // block * block)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1, err1, u1 = w[i1:i2].copy(), np.zeros((i2 - i1, n)), u[i1:i2, i1:i2]
        s = None
        for i in range(i2 - i1):
            row = i1 + i
            if row % block == 0:
                s = block_scales(w1[i:i + block])
                scales[row // block] = s
            qi = np.clip(np.round(w1[i] / s), -8, 7)
            q[row] = qi
            err = (w1[i] - qi * s) / u1[i, i]
            w1[i:] -= np.outer(u1[i, i:], err)
            err1[i] = err
        w[i2:] -= u[i1:i2, i2:].T @ err1
    return q, scales


def pack(q: np.ndarray, scales: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' B (N, K/block, block/2) uint8, low nibble first, value q + 8; and scales (N * K/block)."""
    k, n = q.shape
    blocks = (k + block - 1) // block
    u = np.full((blocks * block, n), 8, np.uint8)
    u[:k] = (q.astype(np.int16) + 8).astype(np.uint8)
    u = u.T.reshape(n, blocks, block)
    b = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    return b, scales.T.reshape(-1)


def hessians(model, activations: list[str], feeds) -> dict[str, np.ndarray]:
    """``H = 2/n X^T X`` of each named activation (the input of a weight MatMul), over ``feeds``."""
    import copy
    import tempfile
    from pathlib import Path

    import onnx

    from retool.runtime import make_session

    m = copy.deepcopy(model)
    known = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=a) for a in activations if a not in known)
    acc: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as td:
        path = Path(td) / "calib.onnx"
        large = m.ByteSize() > 1_900_000_000
        onnx.save(m, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                  location="calib.onnx.data" if large else None)
        sess = make_session(path, threads=None)
        for feed in feeds:
            for name, x in zip(activations, sess.run(activations, feed)):
                x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
                acc[name] = acc.get(name, 0.0) + x.T @ x
                count[name] = count.get(name, 0) + x.shape[0]
        del sess
    return {a: 2.0 * acc[a] / max(1, count[a]) for a in acc}


def apply(rtn_model, fp_model, feeds, block: int = 32) -> int:
    """Replace the ints and scales of ``rtn_model``'s symmetric 4-bit MatMulNBits (written by ORT from
    ``fp_model``) with GPTQ's, calibrated on ``feeds``; returns how many weights were replaced."""

    fp_inits = {i.name: i for i in fp_model.graph.initializer}
    act_of = {n.input[1]: n.input[0] for n in fp_model.graph.node if n.op_type == "MatMul" and n.input[1] in fp_inits}
    inits = {i.name: i for i in rtn_model.graph.initializer}
    targets = []  # (MatMulNBits node, original weight name, the activation it multiplies)
    for node in rtn_model.graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) > 3 and node.input[3]:
            continue  # zero points: not the symmetric layout this writes
        wname = node.input[1][:-3] if node.input[1].endswith("_Q4") else ""  # ORT names B "<weight>_Q4"
        if wname in act_of and node.input[1] in inits and node.input[2] in inits:
            targets.append((node, wname, act_of[wname]))
    dims = {a: int(fp_inits[w].dims[0]) for _, w, a in targets if len(fp_inits[w].dims) == 2}
    chunks, cur, size = [], [], 0
    for a in sorted(dims):  # Hessians are K x K float64: hold at most HESSIAN_BYTES of them at once
        if cur and size + 8 * dims[a] ** 2 > HESSIAN_BYTES:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(a)
        size += 8 * dims[a] ** 2
    chunks += [cur] if cur else []
    done = 0
    for chunk in chunks:
        hs = hessians(fp_model, chunk, feeds)
        done += _rewrite([t for t in targets if t[2] in hs], hs, fp_inits, inits, block)
        del hs
    return done


def _rewrite(targets, hs, fp_inits, inits, block: int) -> int:
    """GPTQ once per activation: the weights that multiply the same input (q, k, v; gate, up) share its
    Hessian and GPTQ treats columns independently, so they are quantized side by side in one pass."""
    from onnx import numpy_helper

    by_act: dict[str, list] = {}
    for t in targets:
        by_act.setdefault(t[2], []).append(t)
    done = 0
    for act, group in by_act.items():
        ws = [numpy_helper.to_array(fp_inits[wname]) for _, wname, _ in group]
        if any(w.ndim != 2 or w.shape[0] != ws[0].shape[0] for w in ws):
            continue
        q, s = gptq(np.concatenate(ws, axis=1), hs[act], block)
        col = 0
        for (node, _, _), w in zip(group, ws):
            n = w.shape[1]
            b, sc = pack(q[:, col:col + n], s[:, col:col + n], block)
            col += n
            old_b, old_s = inits[node.input[1]], inits[node.input[2]]
            if tuple(old_b.dims) != b.shape or int(np.prod(old_s.dims)) != sc.size:
                continue  # another layout than ORT 1.32's: keep round-to-nearest for this weight
            old_b.CopyFrom(numpy_helper.from_array(b, old_b.name))
            sc = sc.astype(numpy_helper.to_array(old_s).dtype).reshape(tuple(old_s.dims))
            old_s.CopyFrom(numpy_helper.from_array(sc, old_s.name))
            done += 1
    return done
