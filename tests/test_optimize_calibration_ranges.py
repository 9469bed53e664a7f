"""Percentile and Entropy calibration on a transformer's -3.4e38 attention mask: numpy's bins failed there."""
from __future__ import annotations

import numpy as np
import pytest

NEG = float(np.finfo(np.float32).min)


def _masked_scores(seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((4, 8, 8)).astype(np.float32)
    a[:, :, -2:] = NEG
    return a


def _constant_large():
    return np.full((4, 16), 1e9, np.float32)


@pytest.mark.parametrize("method,symmetric,make", [("percentile", False, _masked_scores), ("entropy", False, _masked_scores),
                                                   ("percentile", True, _constant_large)])
def test_orts_collector_fails_and_the_safe_one_does_not(method, symmetric, make):
    """The trigger is real (ORT's own collector raises on it), and the safe collector bins it: the mask's
    -3.4e38 (real-valued histograms), a constant large tensor (|x| histograms)."""
    from types import SimpleNamespace

    from onnxruntime.quantization.calibrate import HistogramCollector

    from retool.optimizers.histogram import safe_collector

    kw = dict(method=method, symmetric=symmetric, num_bins=2048, num_quantized_bins=128, percentile=99.99,
              scenario="same")
    data = {"scores": [make()]}
    with pytest.raises(ValueError, match="Too many bins|not finite|finite-sized"):
        HistogramCollector(**kw).collect(data)
    c = safe_collector(SimpleNamespace(**kw))
    c.collect(data)
    c.collect({"scores": [np.random.default_rng(1).standard_normal((4, 8, 8)).astype(np.float32)]})
    res = c.compute_collection_result()
    lo, hi = float(res["scores"][0]), float(res["scores"][1])
    assert np.isfinite(lo) and np.isfinite(hi) and lo < hi


def test_merge_with_a_sentinel_in_a_later_chunk_does_not_explode():
    """First chunk ordinary, second with the mask: ORT would grow the histogram to ~1e40 bins."""
    from types import SimpleNamespace

    from retool.optimizers.histogram import MAX_BINS, safe_collector

    for sym in (False, True):
        c = safe_collector(SimpleNamespace(method="percentile", symmetric=sym, num_bins=2048,
                                           num_quantized_bins=128, percentile=99.99, scenario="same"))
        c.collect({"t": [np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)]})
        c.collect({"t": [_masked_scores(3)]})
        hist = c.histogram_dict["t"][0]
        assert len(hist) <= MAX_BINS and int(hist.sum()) >= 4 * 64 + 4 * 64


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_static_int8_of_a_masked_attention_block_calibrates(tmp_path, method):
    """End to end through optimize: the candidate builds (it used to fail inside calibration)."""
    from fixtures.onnx_masked import masked_attention, masked_samples
    from retool.errors import ValidationFailed
    from retool.optimizers.core import optimize

    src = masked_attention(tmp_path / "attn.onnx")
    data = tmp_path / "c.npz"
    np.savez(data, **masked_samples(40))
    try:
        _, rep = optimize(src, tmp_path / "q.onnx", target="cpu-int8", calibration=data, calibration_method=method,
                          measure=False, accuracy_budget=1)
    except ValidationFailed as exc:  # accuracy is the parity gate's business; calibration must have run
        rep = exc.report
    assert rep.data["calibration"]["method"] == method and rep.data["calibration"]["samples"] == 32
