"""The transformer path: encoder detection, ORT fusions that keep parity, Gather int8, the thread-count key."""
from __future__ import annotations

import numpy as np
import pytest

LOSSY_FIXTURE = {"min_cosine": 0.8, "min_top1": 0.5}  # a 32-wide random encoder loses a lot in int8


def test_encoder_detection(cnn_onnx, transformer_onnx):
    from retool.optimizers.transformer import detect_encoder

    enc = detect_encoder(transformer_onnx)
    assert enc is not None and enc.kind == "text" and enc.model_type == "bert" and enc.layers == 2
    assert detect_encoder(cnn_onnx) is None


def test_fused_transformer_keeps_parity(transformer_onnx, tmp_path):
    from retool.inputs import random_feeds
    from retool.onnx_info import artifact_from_onnx
    from retool.optimizers.transformer import detect_encoder, fuse, op_counts
    from retool.runtime import make_session, run_session

    dst = tmp_path / "fused.onnx"
    stats = fuse(transformer_onnx, dst, detect_encoder(transformer_onnx))
    assert stats.get("SkipLayerNormalization", 0) >= 2 and op_counts(dst)["SkipLayerNormalization"] >= 2
    specs = artifact_from_onnx(transformer_onnx).inputs
    a, b = make_session(transformer_onnx), make_session(dst)
    for seed in range(3):
        feeds = random_feeds(specs, batch=2, seed=seed, sizes={"seq": 12})
        np.testing.assert_allclose(run_session(b, feeds)[0], run_session(a, feeds)[0], atol=1e-4, rtol=1e-3)


def test_dynamic_int8_on_encoder_measures_fused_and_unfused(transformer_onnx, tmp_path):
    import onnx

    from retool.optimizers.core import optimize
    from retool.optimizers.latency import THREADS_KEY, all_threads

    art, rep = optimize(transformer_onnx, tmp_path / "t.onnx", target="cpu-int8-dynamic",
                        tolerance=LOSSY_FIXTURE, threads=1)
    tr = rep.data["transformer"]
    assert tr["encoder"]["kind"] == "text" and tr["fusions"].get("SkipLayerNormalization")
    assert tr["fused_fp32_parity"]["parity:output@held-out"]["cosine"] > 0.99999
    assert set(tr["variants"]) == {"unfused", "fused", "fused-layernorm"}
    assert tr["chosen"] == tr["decision"]["name"] and tr["decision"]["reason"]  # the one rule (retool.speed)
    m = onnx.load(str(art.path))
    ops = {n.op_type for n in m.graph.node}
    assert ("SkipLayerNormalization" in ops) == (tr["chosen"] == "fused")
    assert ("QAttention" in ops) == (tr["chosen"] != "unfused")  # the rewritten attention, quantized
    # the embedding table is int8 now: a quantized 2-D initializer feeds a Gather
    q2d = [t.name for t in m.graph.initializer if t.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)
           and len(t.dims) == 2]
    gathers = {n.input[0] for n in m.graph.node if n.op_type == "Gather"}
    assert set(q2d) & gathers, (q2d, gathers)
    # the fastest intra-op thread count, measured at 1 and at all threads, is in the file for serving
    th = rep.data["threads"]
    assert set(th["measured"]) == {str(t) for t in {1, all_threads()}}
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta[THREADS_KEY] == str(th["best_intra_op_threads"])
    # more threads only when decidedly faster in paired rounds; a tie keeps fewer
    n = str(all_threads())
    decided = n != "1" and th["measured"][n]["decision_vs_1"]["outcome"] == "pass"
    assert th["best_intra_op_threads"] == (all_threads() if decided else 1)


def test_dynamic_int8_saturation_without_vnni_is_measured_away(transformer_onnx, tmp_path):
    """On x86 without VNNI, full-range u8 x s8 dynamic int8 saturates on this encoder (cosine ~0.93);
    retool measures both reduce_range choices and keeps the one that does not."""
    from retool.optimizers.core import optimize
    from retool.optimizers.hardware import detect

    cpu = detect("/proc/cpuinfo")
    if cpu.arch != "x86_64" or cpu.vnni:
        pytest.skip(f"needs an x86 CPU without VNNI, this is {cpu.kind}")
    _, rep = optimize(transformer_onnx, tmp_path / "t.onnx", target="cpu-int8-dynamic", measure=False)
    assert rep.data["profile"]["reduce_range"] is True
    assert any(c.startswith("measured on calibration samples") for c in rep.data["hardware"]["choices"])
    assert rep.data["parity"]["parity:output@held-out"]["cosine"] > 0.999
