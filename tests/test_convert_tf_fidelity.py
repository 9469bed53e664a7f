"""TensorFlow fidelity: GraphDef tensor names, Keras dict / several named inputs, the large-model path.

Parity is checked here by running TensorFlow and onnxruntime directly.
"""
from __future__ import annotations

import json
import re

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


# -- Keras dict inputs and several named inputs ------------------------------------------

def _feeds_dict(seed=0, batch=3):
    rng = np.random.default_rng(seed)
    return {"meta": rng.standard_normal((batch, 4)).astype(np.float32),
            "pixels": rng.standard_normal((batch, 8, 8, 3)).astype(np.float32),
            "ids": rng.integers(0, 10, (batch, 5)).astype(np.int32)}


@pytest.mark.parametrize("form", ["keras", "export", "memory"])
def test_keras_dict_inputs(cli, tmp_path, form):
    # failed before with: The structure of `inputs` doesn't match the expected structure
    model = T.dict_inputs()
    if form == "keras":
        src = T.save_keras(model, tmp_path / "dict_in.keras")
    elif form == "export":
        src = T.save_export(model, tmp_path / "dict_in_export")
    out = tmp_path / "m.onnx"
    if form == "memory":
        from retool.converter.core import convert

        convert(model, out)
    else:
        r = cli("convert", src, "-o", out)
        assert r.code == 0, r.err
    feeds = _feeds_dict()
    # a SavedModel's serving signature names its inputs after the Input layers, not the dict keys
    onnx_names = {"meta": "meta", "pixels": "image", "ids": "token_ids"} if form == "export" else {k: k for k in feeds}
    got, sess = _ort(out, {onnx_names[k]: v for k, v in feeds.items()})
    assert sorted(i.name for i in sess.get_inputs()) == sorted(onnx_names.values())
    assert sorted(got) == ["embedding", "score"]
    ref = model({k: v for k, v in feeds.items()}, training=False)
    for k in got:
        np.testing.assert_allclose(got[k], np.asarray(ref[k]), atol=1e-5, rtol=1e-4)
    assert _report(out)["passed"]


def test_several_named_inputs_with_example_inputs_in_another_order(cli, tmp_path):
    model = T.three_named_inputs()
    src = T.save_keras(model, tmp_path / "three.keras")
    rng = np.random.default_rng(4)
    ex = {"series": rng.standard_normal((2, 2, 5)).astype(np.float32),
          "category": rng.integers(0, 7, (2, 3)).astype(np.int32),
          "dense_features": rng.standard_normal((2, 6)).astype(np.float32)}
    np.savez(tmp_path / "ex.npz", **ex)
    out = tmp_path / "m.onnx"
    r = cli("convert", src, "--example-inputs", tmp_path / "ex.npz", "-o", out)
    assert r.code == 0, r.err
    got, sess = _ort(out, ex)
    assert [i.name for i in sess.get_inputs()] == ["dense_features", "category", "series"]
    ref = model([ex["dense_features"], ex["category"], ex["series"]], training=False)
    np.testing.assert_allclose(got["out"], np.asarray(ref), atol=1e-5, rtol=1e-4)


def test_tf_keras_dict_inputs(tmp_path):
    pytest.importorskip("tf_keras")
    from retool.converter.core import convert

    model = T.tf_keras_dict_inputs()
    out = tmp_path / "m.onnx"
    art, rep = convert(model, out)
    assert rep.passed and sorted(i.name for i in art.inputs) == ["alpha", "zeta"]
    rng = np.random.default_rng(1)
    feeds = {"zeta": rng.standard_normal((2, 6)).astype(np.float32),
             "alpha": rng.standard_normal((2, 2)).astype(np.float32)}
    got, _ = _ort(out, feeds)
    np.testing.assert_allclose(got["out"], model(feeds).numpy(), atol=1e-5, rtol=1e-4)


def test_dict_inputs_need_their_keys(cli, tmp_path):
    src = T.save_keras(T.dict_inputs(), tmp_path / "dict_in.keras")
    r = cli("convert", src, "--input", "a:float32:batch,4", "--input", "b:float32:batch,8,8,3",
            "--input", "c:int32:batch,5", "-o", tmp_path / "m.onnx")
    assert r.code == 2 and "takes a dict of inputs ['ids', 'meta', 'pixels']" in r.err


# -- the large-model path (tf2onnx large_model + one external data file) ---------------------------

def test_large_model_path_writes_external_data(tmp_path, monkeypatch, cli):
    """The path models over 2 GB take, run here on a small model by lowering the size threshold
    (the 2 GB case itself is measured in bench's large_model section)."""
    from retool.converter import tf_export

    monkeypatch.setattr(tf_export, "LARGE_MODEL_BYTES", 10_000)
    model = T.wide_two_inputs(width=96)  # 96 x 96 kernels: above tf2onnx's 1024-element external threshold
    src = T.save_keras(model, tmp_path / "two.keras")
    out = tmp_path / "out" / "two.onnx"
    out.parent.mkdir()
    r = cli("convert", src, "-o", out)
    assert r.code == 0, r.err
    rep = _report(out)
    params = rep["artifact"]["provenance"][0]["params"]
    assert rep["passed"] and params["external_data"] is True and "limit for one protobuf" in params["external_data_reason"]
    assert rep["artifact"]["extra_files"] == ["two.onnx.data"]
    import onnx

    m = onnx.load(str(out), load_external_data=False)
    ext = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ext and all({e.key: e.value for e in t.external_data}["location"] == "two.onnx.data" for t in ext)
    assert (out.parent / "two.onnx.data").stat().st_size > 10_000
    rng = np.random.default_rng(2)
    feeds = {"image": rng.standard_normal((3, 16)).astype(np.float32),
             "meta": rng.standard_normal((3, 4)).astype(np.float32)}
    got, _ = _ort(out, feeds)
    ref = model([feeds["image"], feeds["meta"]], training=False)
    np.testing.assert_allclose(got["cls"], np.asarray(ref[0]), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(got["reg"], np.asarray(ref[1]), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("build,feeds,in_loops", [
    ("sequential_cnn", {"image": (2, 32, 32, 3)}, ()),
    ("sequential_cnn:export", {"image": (2, 32, 32, 3)}, ()),  # a SavedModel: variables behind its signature
    # the LSTM and GRU pass their variables into While loops as resources: those are frozen instead
    ("recurrent", {"tokens": (2, 12)}, ("lstm", "gru")),
    ("attention_gelu", {"x": (2, 10, 16)}, ()),
    ("bn_dropout", {"features": (2, 20)}, ()),  # Dropout's seed state is not in the file: initialized as usual
])
def test_large_model_path_keeps_weights_out_of_the_graph(tmp_path, monkeypatch, cli, build, feeds, in_loops):
    """Convolutions, recurrent loops and attention with their variables fed as graph inputs to
    tf2onnx, then stored as external initializers named after the variables."""
    import onnx
    from retool.converter import keras_load, tf_export, tf_weights

    monkeypatch.setattr(tf_export, "LARGE_MODEL_BYTES", 0)
    monkeypatch.setattr(tf_weights, "APART_MIN_ELEMENTS", 64)
    monkeypatch.setattr(keras_load, "KERAS_STREAM_BYTES", 0)  # the lean .keras load too
    model = getattr(T, build.split(":")[0])()
    src = T.save_export(model, tmp_path / "sm") if build.endswith(":export") else T.save_keras(model, tmp_path / "m.keras")
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    from keras.src.saving import saving_lib

    hooks = (saving_lib.is_memory_sufficient, saving_lib._model_from_config)
    r = cli("convert", src, "-o", out)
    assert r.code == 0, r.err
    assert (saving_lib.is_memory_sufficient, saving_lib._model_from_config) == hooks  # Keras is as it was
    m = onnx.load(str(out), load_external_data=False)
    ext = {t.name for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    big = {v.path for v in model.weights if int(np.prod(v.shape)) >= 64}
    def layer(name):  # "lstm_1/lstm_cell/kernel" -> "lstm" (Keras numbers a session's repeated layer names)
        return re.sub(r"_\d+$", "", name.split("/")[0])

    apart = {p for p in big if layer(p) not in in_loops}
    # each large variable is an external initializer named after it (TF's name: Keras's path less the model's)
    assert apart and all(any(p == e or p.endswith("/" + e) for e in ext) for p in apart)
    assert not any(layer(e) in in_loops for e in ext) if in_loops else len(ext) >= len(big)
    assert [i.name for i in m.graph.input] == list(feeds)
    if not in_loops:  # nothing large left inside the graph
        inline = [t for t in m.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        inline += [a.t for n in m.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
        assert all(np.prod(t.dims) < 64 for t in inline)
    rng = np.random.default_rng(3)
    x = {k: (rng.integers(0, 50, s).astype(np.int32) if k == "tokens" else rng.standard_normal(s).astype(np.float32))
         for k, s in feeds.items()}
    got, sess = _ort(out, x)
    ref = np.asarray(model(x[next(iter(feeds))], training=False))
    np.testing.assert_allclose(next(iter(got.values())), ref, atol=1e-4, rtol=1e-4)


def test_weights_kept_apart_when_the_usual_path_would_not_fit():
    from retool.converter.tf_export import LARGE_MODEL_BYTES, USUAL_PATH_PEAK, weights_apart_reason

    assert weights_apart_reason(100 << 20, available=64 << 30) is None
    assert "protobuf" in weights_apart_reason(LARGE_MODEL_BYTES + 1, available=1 << 50)
    why = weights_apart_reason(1 << 30, available=(USUAL_PATH_PEAK << 30) - 1)
    assert why and "22x" in why and "available" in why
