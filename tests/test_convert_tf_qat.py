"""A Keras quantization-aware-trained model (TFMOT fake-quant layers) is detected as an int8 source and
judged by the int8 tolerances, with the reason in the report (issue 23)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow_model_optimization")
pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]


@pytest.fixture(scope="module")
def qat(tmp_path_factory):
    from fixtures.proc import ROOT

    # its own process: TFMOT needs TF_USE_LEGACY_KERAS=1, which would turn every later tf.keras into Keras 2
    out = tmp_path_factory.mktemp("qat") / "qat_savedmodel"
    r = subprocess.run([sys.executable, "fixtures/tf_qat.py", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_qat_savedmodel_is_an_int8_source(qat, tmp_path, cli):
    import onnx
    import onnxruntime as ort

    from fixtures.tf_qat import data
    from retool.validators.parity import tolerance_for

    out = tmp_path / "qat.onnx"
    r = cli("convert", qat, "-o", out)
    assert r.code == 0, r.err
    d = json.loads(out.with_name("qat.report.json").read_text())["data"]
    assert d["source_precision"] == "int8" and d["tolerance"] == tolerance_for("int8").to_dict()
    assert "FakeQuantWithMinMaxVars" in d["tolerance_reason"] and "quantization-aware" in d["tolerance_reason"]
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # the fake-quant survived as Q/DQ, not dropped
    # independent of retool: the ONNX copy against TensorFlow on fresh inputs
    import tensorflow as tf

    x = data(8, seed=7)
    ref = tf.saved_model.load(str(qat)).signatures["serving_default"](image=tf.constant(x))["logits"].numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.75
    assert np.abs(got - ref).max() < 0.5


def test_fp32_savedmodel_stays_fp32(tmp_path, cli):
    from fixtures import tf_models

    src = tf_models.save_export(tf_models.sequential_cnn(seed=3), tmp_path / "cnn")
    out = tmp_path / "cnn.onnx"
    assert cli("convert", src, "-o", out).code == 0
    assert json.loads(out.with_name("cnn.report.json").read_text())["data"]["source_precision"] == "fp32"
