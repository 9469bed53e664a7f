"""TensorFlow fidelity: GraphDef tensor names, Keras dict / several named inputs, the large-model path.

Parity is checked here by running TensorFlow and onnxruntime directly.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

from fixtures import tf_models as T  # noqa: E402

pytestmark = pytest.mark.tensorflow


def _report(out):
    return json.loads(out.with_name(out.stem + ".report.json").read_text())


def _ort(path, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {o.name: v for o, v in zip(sess.get_outputs(), sess.run(None, feeds))}, sess


def _graphdef_outputs(pb, feeds, outputs):
    import tensorflow as tf

    gd = tf.compat.v1.GraphDef()
    gd.ParseFromString(pb.read_bytes())
    g = tf.Graph()
    with g.as_default():
        tf.import_graph_def(gd, name="")
    with tf.compat.v1.Session(graph=g) as s:
        return s.run(outputs, {f"{k}:0": v for k, v in feeds.items()})


@pytest.mark.parametrize("inp,outs", [("x:0:float32:batch,6", "probs:0"), ("x:0", "probs"),
                                      ("x:float32:batch,6", "probs:0")])
def test_graphdef_takes_tensor_or_node_names_in_both_flags(cli, tmp_path, inp, outs):
    # failed before with: --input names ['x:0'] are not nodes of the graph
    pb = T.save_frozen_graph(tmp_path / "frozen.pb")
    out = tmp_path / "m.onnx"
    r = cli("convert", pb, "--input", inp, "--output-names", outs, "-o", out)
    assert r.code == 0, r.err
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    got, sess = _ort(out, {"x": x})
    assert [i.name for i in sess.get_inputs()] == ["x"] and list(got) == ["probs"]
    (ref,) = _graphdef_outputs(pb, {"x": x}, ["probs:0"])
    np.testing.assert_allclose(got["probs"], ref, atol=1e-6, rtol=1e-5)
    assert _report(out)["passed"]


def test_graphdef_bad_tensor_index(cli, tmp_path):
    pb = T.save_frozen_graph(tmp_path / "frozen.pb")
    r = cli("convert", pb, "--input", "x:1:float32:batch,6", "-o", tmp_path / "m.onnx")
    assert r.code == 2 and "a placeholder has one output, x:0" in r.err
    r = cli("convert", pb, "--input", "nope:0", "-o", tmp_path / "m.onnx")
    assert r.code == 2 and "not nodes or tensors of the graph; placeholders are: x" in r.err
