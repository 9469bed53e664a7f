"""The goal's two halves taken apart from a real onnxruntime QDQ model: int8 weights with float
activations, and 8-bit activations with float weights (optimizers/precision_bound.py)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fixtures.onnx_models import conv_relu


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    d = tmp_path_factory.mktemp("bound")
    src = conv_relu(d / "f.onnx", seed=3)
    cal = np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter([{"x": cal[i:i + 1]} for i in range(len(cal))])

        def get_next(self):
            return next(self.rows, None)

    quantize_static(str(src), str(d / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return src, d / "q.onnx", d


def _run(path, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _ops(path):
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


X = np.random.default_rng(7).standard_normal((16, 3, 8, 8)).astype(np.float32)


def test_weights_half_is_the_float_model_with_onnxruntimes_rounded_weights(qdq):
    import onnx
    from onnx import numpy_helper

    from retool.optimizers.precision_bound import split

    src, q, d = qdq
    counts = split(q, src, d / "w.onnx", d / "a.onnx")
    assert counts["weights"] >= 4 and counts["activations"] >= 6  # x, two Relus, pool, flatten; 3 weights, 3 biases
    assert _ops(d / "w.onnx")["QuantizeLinear"] == 0
    # the reference, by hand: every weight and bias replaced by its stored int8/int32 value times its scale
    qm = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(q)).graph.initializer}
    f = onnx.load(str(src))
    for t in f.graph.initializer:
        vals = qm[t.name + "_quantized"].astype(np.float64)
        scale = qm.get(t.name + "_scale", qm.get(t.name + "_quantized_scale"))
        shape = (-1,) + (1,) * (vals.ndim - 1) if np.ndim(scale) else ()
        t.CopyFrom(numpy_helper.from_array((vals * np.reshape(scale, shape)).astype(np.float32), t.name))
    onnx.save(f, str(d / "rounded.onnx"))
    want = _run(d / "rounded.onnx", X)
    assert np.abs(want - _run(src, X)).max() > 1e-4  # the rounding is visible
    np.testing.assert_allclose(_run(d / "w.onnx", X), want, rtol=1e-5, atol=1e-5)  # and it is all there is


def test_activations_half_keeps_every_pair_and_the_float_weights(qdq):
    import onnx
    from onnx import numpy_helper

    from retool.optimizers.precision_bound import split

    src, q, d = qdq
    split(q, src, d / "w2.onnx", d / "a2.onnx")
    a, full = onnx.load(str(d / "a2.onnx")), onnx.load(str(q))
    inits = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    assert not [n for n in a.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert _ops(d / "a2.onnx")["QuantizeLinear"] == _ops(q)["QuantizeLinear"] > 0
    floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    kept = sorted(v.tobytes() for v in inits.values() if v.dtype == np.float32 and v.size > 1)
    assert kept == sorted(v.tobytes() for k, v in floats.items() if v.size > 1)  # bit for bit
    # 8-bit activations cost something, but far less than the error of a model computed wrongly
    y, ref, qy = _run(d / "a2.onnx", X), _run(src, X), _run(q, X)
    assert 0 < np.abs(y - ref).max() < 0.1 * np.abs(ref).max()
    assert len(full.graph.node) > 0 and not np.array_equal(y, qy)


def test_finding_names_the_half_that_misses():
    from retool.optimizers.goal import parse_goal
    from retool.optimizers.precision_bound import finding

    goal = parse_goal("top1>=0.97")
    miss = {"weights_int8_only": {"meets_goal": False, "top1": 0.8, "top1_lower": 0.76},
            "activations_int8_only": {"meets_goal": True, "top1": 0.99, "top1_lower": 0.975}}
    s = finding(miss, goal)
    assert "int8 weights alone already miss top1>=0.97" in s and "0.800 (bound 0.760)" in s
    both = {"weights_int8_only": {"meets_goal": True, "top1": 0.99, "top1_lower": 0.975},
            "activations_int8_only": {"meets_goal": True, "top1": 0.99, "top1_lower": 0.975}}
    assert "each half alone meets" in finding(both, goal)
