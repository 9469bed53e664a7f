"""Caffe -> ONNX: synthetic caffemodels convert with parity against OpenCV's dnn module."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("cv2")
from fixtures import caffe_nets  # noqa: E402

pytestmark = pytest.mark.caffe


def _ort(path, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _ok(r):
    assert r.code == 0, r.err
    assert "Traceback" not in r.err


@pytest.mark.parametrize("name", caffe_nets.PARITY_NETS)
def test_layer_nets_convert_with_parity(cli, tmp_path, name):
    proto, model = caffe_nets.write_net(name, tmp_path)
    out = tmp_path / f"{name}.onnx"
    r = cli("convert", proto, "--weights", model, "-o", out, "--json")
    _ok(r)
    import json

    report = json.loads(r.out)
    parity = [c for c in report["checks"] if c["name"].startswith("parity:")]
    assert parity and all(c["passed"] for c in parity)
    m = onnx.load(str(out))
    # batch axis is dynamic even though the deploy file declares a fixed batch; checked at batch 1 and 4
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert any("@batch4" in c["name"] for c in parity)


def test_every_table_layer_is_covered_by_parity_or_numpy_tests():
    from retool.converter.caffe.reader import build_net, read_prototxt

    covered = set()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for name in caffe_nets.PARITY_NETS + ("no_opencv",):
            p = Path(d) / f"{name}.prototxt"
            p.write_text(caffe_nets.NETS[name])
            covered |= {L.type for L in build_net(read_prototxt(p)).layers}
    table = {"Convolution", "Deconvolution", "Pooling", "InnerProduct", "BatchNorm", "Scale", "Bias", "Eltwise",
             "ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "BNLL", "Power", "Exp", "Log", "Threshold", "LRN",
             "Concat", "Slice", "Crop", "Flatten", "Reshape", "Softmax", "Dropout", "Split", "Silence", "Permute",
             "Normalize", "PriorBox"}
    assert table <= covered, table - covered


def test_in_place_layers_get_unique_names_and_phase_filtering(tmp_path):
    from retool.converter.caffe.reader import build_net, read_prototxt

    proto, _ = caffe_nets.write_net("v1", tmp_path)
    net = build_net(read_prototxt(proto))
    names = [L.name for L in net.layers]
    assert "drop_train" not in names  # include { phase: TRAIN }
    tops = [t for L in net.layers for t in L.tops]
    assert len(tops) == len(set(tops))
    conv, relu = net.layers[0], net.layers[1]
    assert relu.bottoms == conv.tops and relu.tops == ("conv1",) and conv.tops != ("conv1",)
    assert net.inputs == [("data", (10, 3, 12, 12))]


def test_v1_double_data_matches_float_data(cli, tmp_path):
    """double_data blobs (which OpenCV cannot read) give the same ONNX as the float blobs that passed parity."""
    proto, model = caffe_nets.write_net("v1", tmp_path)
    _ok(cli("convert", proto, "--weights", model, "-o", tmp_path / "f.onnx"))
    dbl = caffe_nets.write_caffemodel(proto, tmp_path / "d.caffemodel", v1=True, legacy=True, double=True)
    r = cli("convert", proto, "--weights", dbl, "-o", tmp_path / "d.onnx", "--json")
    _ok(r)
    assert "double_data" in " ".join(__import__("json").loads(r.out)["warnings"])
    x = {"data": np.random.default_rng(1).standard_normal((2, 3, 12, 12)).astype(np.float32)}
    np.testing.assert_array_equal(_ort(tmp_path / "f.onnx", x)["prob"], _ort(tmp_path / "d.onnx", x)["prob"])


def test_fold_batchnorm_keeps_parity(cli, tmp_path):
    proto, model = caffe_nets.write_net("vision", tmp_path)
    _ok(cli("convert", proto, "--weights", model, "-o", tmp_path / "plain.onnx"))
    _ok(cli("convert", proto, "--weights", model, "-o", tmp_path / "folded.onnx", "--fold-batchnorm"))
    ops = lambda p: [n.op_type for n in onnx.load(str(p)).graph.node]  # noqa: E731
    assert "BatchNormalization" in ops(tmp_path / "plain.onnx")
    assert "BatchNormalization" not in ops(tmp_path / "folded.onnx")
    assert len(ops(tmp_path / "folded.onnx")) < len(ops(tmp_path / "plain.onnx"))


def test_static_batch_and_input_override(cli, tmp_path):
    proto, model = caffe_nets.write_net("vision", tmp_path)
    _ok(cli("convert", proto, "--weights", model, "-o", tmp_path / "s.onnx", "--static-batch"))
    dims = onnx.load(str(tmp_path / "s.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [10, 4, 11, 11]
    # another image size: shapes and prior boxes are recomputed, parity still holds
    proto, model = caffe_nets.write_net("ssd", tmp_path)
    _ok(cli("convert", proto, "--weights", model, "-o", tmp_path / "o.onnx", "--input", "data:float32:batch,3,48,40"))
    m = onnx.load(str(tmp_path / "o.onnx"))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 48, 40]
    prior = next(o for o in m.graph.output if o.name == "prior")
    assert [d.dim_value for d in prior.type.tensor_type.shape.dim] == [1, 2, 12 * 10 * 6 * 4]


def test_layers_opencv_gets_wrong_fall_back_to_the_numpy_reference(cli, tmp_path):
    import json

    proto, model = caffe_nets.write_net("no_opencv", tmp_path)
    out = tmp_path / "n.onnx"
    r = cli("convert", proto, "--weights", model, "-o", out, "--json")
    _ok(r)
    report = json.loads(r.out)
    assert any("OpenCV has no Threshold" in w and "NumPy Caffe reference" in w for w in report["warnings"])
    assert all(c["passed"] for c in report["checks"])
    # and the outputs are Caffe's, computed here by hand
    blobs = caffe_nets.synth_blobs(proto)
    x = np.random.default_rng(3).standard_normal((2, 4, 3, 3)).astype(np.float32)
    got = _ort(out, {"data": x})
    np.testing.assert_array_equal(got["thr"], (x > 0.2).astype(np.float32))
    np.testing.assert_allclose(got["bias"], x + blobs["bias"][0].reshape(1, 4, 1, 1), rtol=1e-6)
    np.testing.assert_allclose(got["log10"], np.log10(1 + 2 * np.abs(x)), rtol=1e-5, atol=1e-6)
    w, b = blobs["ip_t"]  # transpose: weights are (K, N)
    np.testing.assert_allclose(got["ip_t"], x.reshape(2, -1) @ w + b, rtol=1e-4, atol=1e-5)
    assert got["pool_floor"].shape == (2, 4, 1, 1)  # FLOOR: (3-2)//2+1; CEIL would give 2
    np.testing.assert_array_equal(got["pool_floor"][..., 0, 0], x[:, :, :2, :2].max(axis=(2, 3)))


def test_prior_box_matches_ssd_definition():
    from retool.converter.caffe.schema import messages

    pp = messages().PriorBoxParameter(min_size=[4], max_size=[9], aspect_ratio=[2], flip=True, clip=False,
                                      variance=[0.1, 0.1, 0.2, 0.2])
    from retool.converter.caffe.shapes import prior_boxes

    out = prior_boxes(pp, (2, 2), (8, 8))
    assert out.shape == (1, 2, 2 * 2 * 4 * 4)  # 4 priors: min, sqrt(min*max), ar 2, ar 1/2
    first = out[0, 0, :16].reshape(4, 4)
    np.testing.assert_allclose(first[0], [0, 0, 4 / 8, 4 / 8])  # centre (2, 2), 4x4 box
    s = np.sqrt(36) / 2 / 8
    np.testing.assert_allclose(first[1], [0.25 - s, 0.25 - s, 0.25 + s, 0.25 + s], rtol=1e-6)
    np.testing.assert_allclose(out[0, 1, :4], [0.1, 0.1, 0.2, 0.2])


def test_schema_is_private_and_uniquely_named():
    from google.protobuf import descriptor_pool

    from retool.converter.caffe.schema import FILE_NAME, messages

    M = messages()
    assert M.NetParameter.DESCRIPTOR.file.name == FILE_NAME == "retool/caffe_subset_v1.proto"
    assert M.NetParameter.DESCRIPTOR.full_name == "retool_caffe.NetParameter"
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindFileByName(FILE_NAME)
    # field numbers follow caffe.proto, so a message written with them round-trips
    net = M.NetParameter()
    net.ParseFromString(bytes.fromhex("0a0378797a"))  # field 1 (name) = "xyz"
    assert net.name == "xyz"


@pytest.mark.parametrize("name", caffe_nets.PARITY_NETS)
def test_numpy_reference_agrees_with_opencv(tmp_path, name):
    """The fallback reference is itself checked against OpenCV on every net OpenCV runs faithfully."""
    from retool.converter.base import ConvertRequest
    from retool.converter.caffe.converter import CaffeConverter
    from retool.converter.caffe.reference_numpy import NumpyReference

    proto, model = caffe_nets.write_net(name, tmp_path)
    src = CaffeConverter().load(ConvertRequest(proto, tmp_path / "x.onnx", "caffe", model))
    assert not src.divergences
    spec = src.input_specs[0]
    x = {spec.name: np.random.default_rng(5).standard_normal((3,) + spec.shape[1:]).astype(np.float32)}
    ours = NumpyReference(src.net, src.output_tensors).run(x)
    cv = src.run(x)
    for a, b, t in zip(ours, cv, src.output_tensors):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=t)


@pytest.mark.parametrize("size,k,s,p,ceil,expected", [
    (5, 2, 2, 1, True, 3),    # ceil gives 4, but the 4th window would start in the padding
    (6, 2, 2, 1, True, 4),
    (6, 3, 2, 1, True, 4),    # floor would give 3
    (6, 3, 2, 1, False, 3),
    (55, 3, 2, 0, True, 27),  # AlexNet pool1
    (13, 3, 2, 0, True, 6),
])
def test_caffe_pooling_output_size(size, k, s, p, ceil, expected):
    from retool.converter.caffe.shapes import pool_out

    assert pool_out(size, k, s, p, ceil) == expected
