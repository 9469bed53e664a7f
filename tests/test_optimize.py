"""optimize(): accuracy-aware fallback, calibration sources, external data, latency report, fp16 fix-up."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from retool.errors import UsageError, ValidationFailed


def _dq_fed(model, node_name) -> bool:
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    return any(i in dq for i in node.input)


def test_accuracy_fallback_keeps_costly_nodes_in_float(cnn_onnx, tmp_path):
    import onnx

    from retool.optimizers.core import optimize

    _, first = optimize(cnn_onnx, tmp_path / "plain.onnx", target="cpu-int8", measure=False)
    assert first.data["excluded_nodes"] == []
    cos0 = first.data["parity"]["parity:output@held-out"]["cosine"]
    strict = (1 + cos0) / 2  # stricter than what full quantization reached
    art, report = optimize(cnn_onnx, tmp_path / "strict.onnx", target="cpu-int8", measure=False,
                           tolerance={"min_cosine": strict})
    d = report.data
    assert report.passed
    assert d["excluded_nodes"], "the fallback excluded nothing"
    assert d["accuracy_search"][0]["passed"] is False and d["accuracy_search"][-1]["passed"] is True
    assert d["parity"]["parity:output@held-out"]["cosine"] >= strict
    # excluded nodes really stay float: no DequantizeLinear feeds them
    m = onnx.load(str(art.path))
    names = {n.name for n in m.graph.node}
    for node in d["excluded_nodes"]:
        if node in names:
            assert not _dq_fed(m, node), node
    # source layers come from the torch exporter's metadata (module paths such as 'head', 'features.5')
    layers = [x["source_layer"] for x in d["excluded_layers"]]
    assert all(l and not l.startswith("node_") for l in layers), layers
    assert art.provenance[-1].params["excluded_nodes"] == d["excluded_nodes"]


def test_tolerance_still_missed_raises_and_writes_nothing(cnn_onnx, tmp_path):
    from retool.onnx_info import sidecar_report_path
    from retool.optimizers.core import optimize

    out = tmp_path / "never.onnx"
    with pytest.raises(ValidationFailed) as ei:
        # fp16 inputs are rounded even with every node kept fp32: cosine 1.0 exactly is unreachable
        optimize(cnn_onnx, out, target="gpu-fp16", measure=False, accuracy_budget=1,
                 tolerance={"min_cosine": 1.0, "atol": 0.0, "rtol": 0.0})
    assert ei.value.exit_code == 6
    assert not out.exists()
    rep = ei.value.report
    assert rep is not None and not rep.passed and len(rep.data["accuracy_search"]) == 2
    assert sidecar_report_path(out).exists()
    assert not list(tmp_path.glob(".retool-tmp-*")), "staging folder left behind"


def test_latency_is_measured_against_fp32(cnn_onnx, tmp_path):
    from retool.optimizers.core import optimize

    _, report = optimize(cnn_onnx, tmp_path / "m.onnx", target="cpu-int8", threads=1)
    lat = report.data["latency"]
    assert lat["threads"] == 1 and lat["batch"] == 1
    assert lat["fp32_p50_ms"] > 0 and lat["candidate_p50_ms"] > 0
    # one quantity everywhere: fp32 p50 / candidate p50 (> 1 faster), with its paired spread
    assert lat["speedup"] == pytest.approx(lat["fp32_p50_ms"] / lat["candidate_p50_ms"], rel=2e-3)
    assert "ratio" not in lat and len(lat["speedup_iqr"]) == 2 and lat["speedup_verdict"] in ("faster", "slower", "none")
    info = [c for c in report.checks if c.name == "latency.speedup"]
    assert info and info[0].severity == "info" and "×" in info[0].message


def test_cpu_auto_measures_candidates_and_says_why(transformer_onnx, tmp_path):
    from retool.optimizers.core import optimize

    art, report = optimize(transformer_onnx, tmp_path / "auto.onnx", target="cpu-auto", threads=1)
    auto = report.data["auto"]
    assert art.target == auto["chosen"] == report.data["chosen_target"]
    measured = [r for r in auto["candidates"] if r.get("p50_ms") is not None]
    assert measured, auto
    chosen = next(r for r in auto["candidates"] if r["target"] == auto["chosen"])
    assert chosen["passed"] and chosen["reason"].startswith("chosen")
    # the fastest by median, unless a faster one was inside the noise (then the higher precision stays)
    assert min(r["p50_ms"] for r in measured if r["passed"]) == chosen["p50_ms"] or "higher precision" in auto["why"]
    assert report.data["latency"]["speedup"] > 0


def _save_external(src, dst):
    import onnx

    m = onnx.load(str(src))
    onnx.save(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=dst.name + ".weights", size_threshold=1024)


@pytest.mark.parametrize("target", ["cpu", "cpu-int8", "gpu-fp16"])
def test_external_data_passes_through(cnn_onnx, tmp_path, target):
    from retool.fsutil import external_data_files
    from retool.optimizers.core import optimize
    from retool.runtime import make_session

    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir(), out_dir.mkdir()
    src = src_dir / "big.onnx"
    _save_external(cnn_onnx, src)
    assert external_data_files(src)
    out = out_dir / "big-opt.onnx"
    art, report = optimize(src, out, target=target, measure=False)
    assert report.passed
    assert art.extra_files == ("big-opt.onnx.data",)
    assert (out_dir / "big-opt.onnx.data").exists()
    assert external_data_files(out) == ("big-opt.onnx.data",)
    make_session(out, level="extended")
    assert sorted(p.name for p in out_dir.iterdir()) == ["big-opt.onnx", "big-opt.onnx.data", "big-opt.report.json"]


def test_calibration_npz_folder_and_methods(cnn_onnx, tmp_path):
    from retool.optimizers.core import optimize

    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 3, 32, 32)).astype(np.float32)
    npz = tmp_path / "calib.npz"
    np.savez(npz, x=x)
    art, report = optimize(cnn_onnx, tmp_path / "a.onnx", target="cpu-int8", calibration=npz, measure=False,
                           calibration_method="entropy")
    cal = report.data["calibration"]
    assert cal["random"] is False and cal["method"] == "entropy" and cal["kind"] == "npz"
    assert cal["samples"] == 8 and cal["heldout_items"] == 2  # 20 % held apart for parity
    assert cal["digest"] == hashlib.sha256(npz.read_bytes()).hexdigest()
    assert art.provenance[-1].params["calibration_digest"] == cal["digest"]
    assert not any("NO CALIBRATION" in w for w in report.warnings)

    folder = tmp_path / "npys"
    folder.mkdir()
    for i in range(5):
        np.save(folder / f"s{i}.npy", x[i])  # one sample per file, no batch axis
    _, report = optimize(cnn_onnx, tmp_path / "b.onnx", target="npu-uint8", calibration=folder, measure=False,
                         calibration_method="percentile")
    cal = report.data["calibration"]
    assert cal["kind"] == "folder" and cal["samples"] == 4 and cal["method"] == "percentile"


def test_transformer_calibration_npz(transformer_onnx, tmp_path):
    from retool.optimizers.core import optimize

    tokens = np.random.default_rng(3).integers(0, 64, size=(6, 9)).astype(np.int64)
    np.savez(tmp_path / "tok.npz", tokens=tokens)
    _, report = optimize(transformer_onnx, tmp_path / "t.onnx", target="arm64-int8", calibration=tmp_path / "tok.npz",
                         measure=False, tolerance={"min_top1": None})
    cal = report.data["calibration"]
    assert cal["samples"] == 5 and cal["random"] is False and report.passed
    assert report.data["parity"]["heldout_source"] == str(tmp_path / "tok.npz")


def test_calibration_image_folder(cnn_onnx, tmp_path):
    cv2 = pytest.importorskip("cv2")
    from retool.optimizers.core import optimize

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(6):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    _, report = optimize(cnn_onnx, tmp_path / "img.onnx", target="cpu-int8", calibration=folder, measure=False,
                         preprocess="mean=0.5,0.5,0.5;std=0.25,0.25,0.25")
    cal = report.data["calibration"]
    assert cal["kind"] == "images" and cal["samples"] == 5 and cal["random"] is False
    assert cal["preprocess"]["size"] == [32, 32] and cal["preprocess"]["layout"] == "nchw"


@pytest.mark.parametrize("make,match", [
    (lambda d: np.savez(d / "c.npz", wrong=np.zeros((2, 3, 32, 32), np.float32)) or d / "c.npz", "missing x"),
    (lambda d: np.savez(d / "c.npz", x=np.zeros((2, 4, 32, 32), np.float32)) or d / "c.npz", "dim 1 must be 3"),
    (lambda d: np.savez(d / "c.npz", x=np.zeros((2, 32, 32), np.float32)) or d / "c.npz", "shape"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "no .npy, .npz or image files"),
])
def test_bad_calibration_is_a_usage_error(cnn_onnx, tmp_path, make, match):
    from retool.optimizers.core import optimize

    data = make(tmp_path)
    with pytest.raises(UsageError, match=match) as ei:
        optimize(cnn_onnx, tmp_path / "o.onnx", target="cpu-int8", calibration=data, measure=False)
    assert "\n" not in str(ei.value)
    assert not (tmp_path / "o.onnx").exists()


def test_fp16_handles_graph_output_that_feeds_another_node(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from retool.optimizers.fp16 import convert_fp16
    from retool.runtime import make_session

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), helper.make_node("Relu", ["y"], ["z"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    src, dst = tmp_path / "two.onnx", tmp_path / "two16.onnx"
    onnx.save(m, str(src))
    warnings = convert_fp16(src, dst)
    assert any("Identity" in w for w in warnings)
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    y, z = make_session(dst, level="extended").run(None, {"x": x})
    assert y.dtype == np.float32 and np.allclose(y, x @ numpy_helper.to_array(w), atol=1e-2)
    assert np.allclose(z, np.maximum(y, 0), atol=1e-2)


def test_unknown_target_and_non_onnx_are_usage_errors(cnn_onnx, tmp_path):
    from retool.optimizers.core import optimize

    with pytest.raises(UsageError, match="known: cpu, cpu-int8") as ei:
        optimize(cnn_onnx, tmp_path / "o.onnx", target="cpu-int9")
    assert "did you mean 'cpu-int8'" in str(ei.value)
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n")
    with pytest.raises(UsageError, match="not a readable ONNX model|not an ONNX model"):
        optimize(bad, tmp_path / "o.onnx", target="cpu")


def test_targets_are_declarative_profiles():
    from retool.optimizers.targets import TargetProfile, all_targets

    profiles = all_targets()
    names = [p.name for p in profiles]
    for want in ("cpu", "cpu-int8", "cpu-int8-dynamic", "arm64-int8", "gpu-fp16", "tensorrt-int8", "npu-uint8",
                 "cpu-auto"):
        assert want in names
    for p in profiles:
        assert isinstance(p, TargetProfile) and p.describe()
        json.dumps(p.to_dict())
        if p.method == "static":
            assert p.activation_type in ("int8", "uint8") and p.weight_type in ("int8", "uint8")
            assert p.graph_level != "all"
    with pytest.raises(Exception):
        profiles[0].per_channel = True  # frozen


def test_artifact_input_keeps_provenance_chain(cnn_onnx, tmp_path):
    from retool.onnx_info import artifact_from_onnx
    from retool.optimizers.core import optimize

    src = artifact_from_onnx(cnn_onnx)
    art, report = optimize(src, tmp_path / "c.onnx", target="cpu", measure=False)
    assert [p.stage for p in art.provenance] == [p.stage for p in src.provenance] + ["optimize"]
    assert art.precision == "fp32" and art.target == "cpu"
    # the sidecar lets the next stage pick the chain up again from the file alone
    again = artifact_from_onnx(art.path)
    assert again.provenance == art.provenance and again.target == "cpu"


def test_a_simplifier_that_grows_the_graph_is_dropped_without_a_warning(tmp_path):
    """onnxsim growing a graph needs nothing from the user: the graph before it is optimised as usual,
    so no 'warning:' line; a simplifier that changes the outputs still warns."""
    import onnx
    from onnx import TensorProto, helper

    from retool.optimizers.graph import GraphResult, adopt_simplified

    def chain(path, n):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
        names = ["x"] + [f"t{i}" for i in range(n - 1)] + ["y"]
        nodes = [helper.make_node("Relu", [names[i]], [names[i + 1]]) for i in range(n)]
        onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                                    opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return path

    small, big = chain(tmp_path / "small.onnx", 1), chain(tmp_path / "big.onnx", 3)
    res = GraphResult(tmp_path / "out.onnx")
    assert adopt_simplified("onnxsim", small, big, None, res) is False and res.warnings == []
    feeds = {"x": np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)}
    assert adopt_simplified("onnxsim", big, small, feeds, res) is True and res.warnings == []
