"""Issue 24 item 1: an accuracy goal's search for an int8 mix on a CNN like the anchor (random weights,
batch norm recalibrated on natural-like images, standardised class scores)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def _step(speed, lo, hi):
    return {"latency": {"ratio_vs_fp32": {"decision": {"estimate": speed, "interval": [lo, hi], "confidence": 0.95}}}}


def test_speed_floor_is_the_rules_verdict():
    """Only a decided verdict stops the search: below the floor beyond the noise stops, straddling goes on."""
    from retool.optimizers.goal import MIN_SPEEDUP, below_floor

    assert MIN_SPEEDUP == 1.5
    why = below_floor(_step(1.2, 1.1, 1.3))
    assert why and "decidedly below the goal's floor of 1.5x" in why and "1.20" in why
    assert below_floor(_step(1.45, 1.3, 1.6)) is None  # undecided: the safe side is to go on
    assert below_floor(_step(2.8, 2.6, 3.0)) is None
    assert below_floor({"latency": {"error": "x"}}) is None and below_floor({}) is None


def test_search_stops_keeping_nodes_in_float_below_the_floor(tmp_path):
    """Each step keeps more nodes in float and is slower; the step decidedly below 1.5x ends the search."""
    from retool.optimizers.accuracy import search
    from retool.optimizers.goal import below_floor

    speeds = {0: 3.0, 1: 2.2, 2: 1.2, 3: 1.1}
    seen = []

    def build(excluded, i):
        seen.append(len(excluded))
        return tmp_path / f"m{len(excluded)}.onnx"

    def timing(path):
        s = speeds[seen.index(int(path.stem[1:]))]
        return {"p50_ms": 10 / s, "ratio_vs_fp32": {"decision": {"estimate": s, "interval": [s - .05, s + .05]}}}

    rank = lambda path, ex: [(f"n{i}", 1.0 / (i + 1)) for i in range(10)]  # noqa: E731
    res = search(build, lambda p: (False, []), rank, budget=4, timing=timing, floor=below_floor)
    assert [len(a["excluded"]) for a in res.attempts] == [0, 1, 3]  # the 1.2x step (3 float) is the last
    assert "stopped" in res.attempts[-1] and "stopped" not in res.attempts[1] and not res.passed


def test_natural_images_are_seeded_and_unit_scale():
    from fixtures.cnn_anchor import natural_images

    a, b = natural_images(4, 3, (3, 32, 32)), natural_images(4, 3, (3, 32, 32))
    assert a.dtype == np.float32 and a.shape == (4, 3, 32, 32) and np.array_equal(a, b)
    assert 0.5 < float(a.std()) < 2.0 and not np.array_equal(a, natural_images(4, 4, (3, 32, 32)))
    # power falls with frequency: neighbouring pixels correlate (white noise: about 0)
    corr = np.corrcoef(a[:, :, :, :-1].ravel(), a[:, :, :, 1:].ravel())[0, 1]
    assert corr > 0.5
