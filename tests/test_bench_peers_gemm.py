"""The GEMM limit of bench's machine section (bench/gemm.py): the graphs compute the GEMM they claim,
and the figure carries both kernels' GOP/s and the paired int8 / fp32 interval (no timing asserted)."""
from __future__ import annotations

import numpy as np


def test_gemm_graphs_are_the_stated_fp32_and_u8s8_products():
    from bench import gemm
    from retool.runtime import make_session

    rng = np.random.default_rng(3)
    a = rng.standard_normal((gemm.M, gemm.K)).astype(np.float32)
    g = gemm._graph("MatMul")
    b = np.frombuffer(g.graph.initializer[0].raw_data, np.float32).reshape(gemm.K, gemm.N)
    y = make_session(g, threads=1).run(None, {"a": a})[0]
    np.testing.assert_allclose(y, a @ b, rtol=1e-4, atol=1e-3)

    q = gemm._graph("MatMulInteger")
    bq = np.frombuffer(q.graph.initializer[0].raw_data, np.int8).reshape(gemm.K, gemm.N)
    aq = rng.integers(0, 256, (gemm.M, gemm.K)).astype(np.uint8)
    yq = make_session(q, threads=1).run(None, {"a": aq})[0]
    assert yq.dtype == np.int32
    np.testing.assert_array_equal(yq, (aq.astype(np.int64) - 128) @ bq.astype(np.int64))


def test_gemm_limit_reports_both_kernels_and_their_paired_ratio():
    from bench.gemm import measure
    from bench.machine import _gemm_text

    got = measure(threads=1, budget_s=0.2, min_rounds=4)
    assert got["shape_mkn"] == [512, 1024, 1024] and got["threads"] == 1
    for k in ("fp32_gops", "u8s8_gops"):
        assert got[k]["unit"] == "GOP/s" and got[k]["better"] == "higher" and got[k]["n"] >= 4
    s = got["u8s8_speedup_over_fp32"]
    assert s["rounds"] >= 4 and s["ci95"][0] <= s["estimate"] <= s["ci95"][1]
    assert "GEMM limit at 1 thread(s): fp32" in _gemm_text(got)
