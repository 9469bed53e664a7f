"""A quantized build slower than fp32 is said at optimize time, with the figures and the likely reason."""
from __future__ import annotations

import numpy as np


def _rounds(center, n=60, seed=0, spread=0.03):
    rng = np.random.default_rng(seed)
    return list(center * rng.normal(1.0, spread, n).clip(min=0.5))


def test_the_decision_and_its_warning_on_synthetic_timings():
    """The same function optimize uses, driven by timings whose answer is known: 1.6x slower, and faster."""
    from retool.optimizers import hardware
    from retool.optimizers.latency import slower_verdict, versus_fp32

    fp32, slow, fast = _rounds(0.05, seed=1), _rounds(0.08, seed=2), _rounds(0.03, seed=3)
    d = versus_fp32(fp32, slow)
    assert d.outcome == "fail"
    v = slower_verdict(d, name="cpu-int8", precision="int8", method="static", fp32_p50_ms=0.05, cand_p50_ms=0.08,
                       threads=1, cpu=hardware.PRESETS["x86-avx2"])
    assert v["slower"] and "SLOWER than fp32" in v["warning"] and "0.080 ms vs 0.050 ms" in v["warning"]
    assert "95% CI" in v["warning"] and "slower" in v["warning"]
    assert any("small" in r for r in v["reasons"]) and any("no VNNI" in r for r in v["reasons"])
    # on a VNNI CPU the VNNI reason is not given; a weight-only build gets its own
    v = slower_verdict(d, name="cpu-int8-weight", precision="int8", method="weight_only", fp32_p50_ms=5.0,
                       cand_p50_ms=8.0, threads=1, cpu=hardware.PRESETS["x86-vnni"])
    assert v["slower"] and not any("VNNI" in r for r in v["reasons"]) and any("MatMulNBits" in r for r in v["reasons"])
    d = versus_fp32(fp32, fast)
    assert d.outcome == "pass"
    v = slower_verdict(d, name="cpu-int8", precision="int8", method="static", fp32_p50_ms=0.05, cand_p50_ms=0.03,
                       threads=1, cpu=hardware.PRESETS["x86-avx2"])
    assert not v["slower"] and "warning" not in v
    # within the noise: not called slower
    assert versus_fp32(fp32, _rounds(0.0505, seed=4)).outcome != "fail"


def test_tiny_model_records_the_verdict_and_warns_when_slower(tmp_path, capsys):
    """A real run on a tiny model: the report always carries the verdict; when it says slower,
    the warning is in the report and was printed (a 4x3 MatMul is usually slower in int8)."""
    from fixtures.onnx_tiny import linear
    from retool.optimizers.core import optimize

    src = linear(tmp_path / "tiny.onnx", features=16, classes=8)
    _, rep = optimize(src, tmp_path / "q.onnx", target="cpu-int8", threads=1)
    v = rep.data["speed_vs_fp32"]
    assert v["decision"]["outcome"] in ("pass", "fail", "undecided") and v["fp32_p50_ms"] > 0
    err = capsys.readouterr().err
    warned = [w for w in rep.warnings if "SLOWER than fp32" in w]
    if v["slower"]:
        assert warned and "likely:" in warned[0] and "SLOWER than fp32" in err and "small" in warned[0]
        assert "--target cpu-int8 forces it" in warned[0]
    else:
        assert not warned
