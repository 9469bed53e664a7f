"""A TF-Hub-style SavedModel without signatures converts through its restored ``__call__`` when --input
declares the inputs; without --input, one line names the flag (issue 23)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
pytestmark = pytest.mark.tensorflow


@pytest.fixture(scope="module")
def unsigned(tmp_path_factory):
    from fixtures import tf_unsigned

    return tf_unsigned.save_unsigned(tmp_path_factory.mktemp("tf") / "tagger", seed=5)


def test_without_input_one_line_names_the_flag(unsigned, tmp_path, cli):
    out = tmp_path / "t.onnx"
    r = cli("-q", "convert", unsigned, "-o", out)
    assert r.code == 2 and "Traceback" not in r.err
    lines = [ln for ln in r.err.strip().splitlines() if ln.startswith("retool: error")]
    assert len(lines) == 1 and "no signatures" in lines[0] and "--input x:float32:batch,d1,8" in lines[0]
    assert not out.exists()


def test_restored_call_converts_with_input(unsigned, tmp_path, cli):
    import onnxruntime as ort

    from fixtures import tf_unsigned

    out = tmp_path / "t.onnx"
    r = cli("convert", unsigned, "-o", out, "--input", "x:float32:batch,time,8", "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["passed"] and rep["artifact"]["provenance"][0]["params"]["source_kind"] == "saved_model[__call__]"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch, time in ((1, 4), (3, 9)):  # both sides of the tf.cond on the sequence length
        x = rng.standard_normal((batch, time, 8)).astype(np.float32)
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], tf_unsigned.reference(x, seed=5), atol=1e-5)


def test_input_the_function_was_not_traced_for(unsigned, tmp_path, cli):
    r = cli("-q", "convert", unsigned, "-o", tmp_path / "t.onnx", "--input", "x:float32:batch,time,5")
    assert r.code == 2 and "not traced for --input" in r.err and "float32[None, None, 8]" in r.err
