"""The samples file publish stores for retool repo check (no server needed)."""
import numpy as np
import onnx
from onnx import TensorProto, helper

from fixtures.onnx_tiny import linear
from retool.publish import open_repo, publish
from retool.serve import samples


def test_samples_hold_held_out_inputs_and_the_outputs_they_give(tmp_path):
    publish(linear(tmp_path / "m.onnx"), tmp_path / "repo", "m", max_batch_size=3, max_regression="off")
    repo = open_repo(tmp_path / "repo")
    entry = repo.manifest("m", 1)["samples"]
    assert entry["rows"] == 3 and entry["batched"] and entry["file"] == "samples.npz"
    data = samples.load((tmp_path / "repo" / "m" / "1" / "samples.npz").read_bytes())
    assert data["in"]["x"].shape == (3, 4) and data["out"]["y"].shape == (3, 3)
    import onnxruntime as ort

    want = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": data["in"]["x"]})[0]
    np.testing.assert_allclose(data["out"]["y"], want, rtol=1e-6)
    assert repo.verify("m") == ([], 3)  # model, samples, manifest: all hashed


def test_a_model_random_data_cannot_feed_still_publishes_without_samples(tmp_path):
    g = helper.make_graph([helper.make_node("Identity", ["s"], ["t"])], "strings",
                          [helper.make_tensor_value_info("s", TensorProto.STRING, ["batch"])],
                          [helper.make_tensor_value_info("t", TensorProto.STRING, ["batch"])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "s.onnx")
    res = publish(tmp_path / "s.onnx", tmp_path / "repo", "s", max_regression="off")
    assert "error" in res.manifest["samples"] and "samples.npz" not in res.manifest["files"]


def test_compare_says_how_far_apart():
    a = {"y": np.array([[1.0, 2.0]], np.float32)}
    assert samples.compare(a, a)["passed"] and samples.compare(a, a)["max_abs"] == 0
    off = samples.compare({"y": a["y"] + 0.5}, a)
    assert not off["passed"] and off["max_abs"] == 0.5
    assert not samples.compare({"y": a["y"][:, :1]}, a)["passed"]


def test_compare_for_figures_only_warns_nothing():
    """repo check's comparison with the source reference asks for figures with atol=inf: numpy warned
    'One of rtol or atol is not valid' into every serve step."""
    import warnings

    a = {"y": np.array([[1.0, 2.0]], np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = samples.compare({"y": a["y"] + 0.5}, a, atol=float("inf"))
    assert got["passed"] and got["max_abs"] == 0.5 and got["min_cosine"] > 0.99
