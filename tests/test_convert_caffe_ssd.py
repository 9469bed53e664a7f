"""Caffe SSD: DetectionOutput lowered to standard ONNX, checked against OpenCV's detection_out.

The tests run OpenCV and onnxruntime themselves and match detections without regard
to order, independently of retool's report; the fixture net is checked to produce
real detections (and enough of them that NMS and keep_top_k cut).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from fixtures import caffe_ssd as F  # noqa: E402

pytestmark = pytest.mark.caffe


def _opencv(proto, model, x):
    net = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    net.enableFusion(False)
    net.setInput(x)
    return net.forward("detection_out")


def _ort(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["detection_out"], {"data": x})[0]


def _real(a):
    rows = np.asarray(a, np.float64).reshape(-1, 7)
    return rows[(rows[:, 1] >= 0) & (rows[:, 2] > 0)]  # OpenCV pads with zero rows


def _assert_same_detections(got, ref, atol=1e-4):
    """One-to-one: same image, label and score, boxes within atol; order does not matter."""
    g, r = _real(got), _real(ref)
    assert len(g) == len(r), (len(g), len(r))
    free = np.ones(len(g), bool)
    for row in r:
        d = np.abs(g[:, 2:] - row[2:]).max(axis=1)
        ok = np.where(free & (g[:, 0] == row[0]) & (g[:, 1] == row[1]) & (d <= atol))[0]
        assert len(ok), f"no match for {row}"
        free[ok[np.argmin(d[ok])]] = False


def _convert(cli, tmp_path, **params):
    proto, model = F.write_ssd(tmp_path, conf_scale=0.5, **params)
    out = tmp_path / "ssd.onnx"
    r = cli("convert", proto, "--weights", model, "-o", out, "--json")
    assert r.code == 0, r.err
    return proto, model, out, json.loads(r.out)


def test_fixture_net_makes_real_detections(tmp_path):
    proto, model = F.write_ssd(tmp_path, conf_scale=0.5)
    det = _real(_opencv(proto, model, F.image(0)))
    assert len(det) == 20  # keep_top_k cut it: more boxes passed threshold and NMS
    assert len(set(det[:, 1])) >= 2 and det[:, 2].min() > 0.3
    proto, model = F.write_ssd(tmp_path, conf_scale=0.5, keep_top_k=10000, top_k=10000, name="all")
    assert len(_real(_opencv(proto, model, F.image(0)))) > 100


@pytest.mark.parametrize("params", [{}, {"code_type": "CORNER"}, {"confidence": 0.6, "keep_top_k": 200, "top_k": 400},
                                    {"nms": 0.2, "background": 2}],
                         ids=["center_size", "corner", "no_keep_cut", "nms_bg2"])
def test_detection_output_matches_opencv(cli, tmp_path, params):
    proto, model, out, rep = _convert(cli, tmp_path, **params)
    checks = {c["name"]: c for c in rep["checks"]}
    for b in (1, 4):
        c = checks[f"parity:detection_out@batch{b}"]
        assert c["passed"] and c["details"]["matched"] > 0 and c["details"]["kind"] == "detections"
        assert checks[f"parity:mbox_loc@batch{b}"]["passed"]  # the raw heads keep their element-wise check
    for b in (1, 3):
        x = F.image(7, batch=b)
        got = _ort(out, x)
        assert got.shape[:2] == (1, 1) and got.shape[3] == 7
        ref = _opencv(proto, model, x)
        assert len(_real(ref)) > 0
        _assert_same_detections(got, ref)
        assert set(_real(got)[:, 0]) == set(range(b))


def test_output_rows_are_caffe_layout_and_dynamic(tmp_path, cli):
    import onnx

    _, _, out, rep = _convert(cli, tmp_path)
    dims = onnx.load(str(out)).graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == [1, 1, "detections", 7]
    rows = _ort(out, F.image(3, batch=2))[0, 0]
    # by image, then label ascending, then score descending
    keys = [(r[0], r[1], -r[2]) for r in rows]
    assert keys == sorted(keys)
    assert rep["artifact"]["outputs"][0]["shape"] == [1, 1, "detections", 7]


def test_no_detection_gives_caffes_marker_rows(cli, tmp_path):
    proto, model, out, rep = _convert(cli, tmp_path, confidence=0.99)
    got = _ort(out, F.image(0, batch=2))[0, 0]
    np.testing.assert_array_equal(got, [[0, -1, -1, -1, -1, -1, -1], [1, -1, -1, -1, -1, -1, -1]])
    assert len(_real(_opencv(proto, model, F.image(0, batch=2)))) == 0
    assert rep["passed"]


def test_keep_all_uses_the_numpy_reference_and_matches_opencv_without_a_cut(cli, tmp_path):
    # OpenCV's DetectionOutput fails with keep_top_k -1: retool checks against its NumPy Caffe instead;
    # here OpenCV with a keep_top_k too large to cut anything is the independent reference.
    _, _, out, rep = _convert(cli, tmp_path, keep_top_k=-1, top_k=-1)
    assert rep["artifact"]["provenance"][0]["params"]["reference"] == "numpy"
    assert any("keep_top_k -1" in w for w in rep["warnings"])
    proto, model = F.write_ssd(tmp_path, conf_scale=0.5, keep_top_k=100000, top_k=-1, name="big")
    x = F.image(5)
    _assert_same_detections(_ort(out, x), _opencv(proto, model, x))


def test_corner_size_against_the_numpy_reference(cli, tmp_path):
    _, _, out, rep = _convert(cli, tmp_path, code_type="CORNER_SIZE")
    c = [c for c in rep["checks"] if c["name"] == "parity:detection_out@batch1"][0]
    assert c["passed"] and c["details"]["matched"] > 0


def test_detection_comparator_catches_wrong_boxes():
    from retool.converter.caffe.detection_parity import compare_detections

    ref = np.array([[0, 1, 0.9, 0.1, 0.1, 0.5, 0.5], [0, 2, 0.8, 0.2, 0.2, 0.6, 0.6]], np.float32)
    padded = np.concatenate([ref[::-1], np.zeros((3, 7), np.float32)])  # reordered, OpenCV-style padding
    assert compare_detections("d", padded.reshape(1, 1, -1, 7), ref.reshape(1, 1, -1, 7)).passed
    moved = ref.copy()
    moved[1, 4] += 1e-3
    bad = compare_detections("d", ref, moved)
    assert not bad.passed and bad.details["unmatched_reference"] and bad.details["unmatched_candidate"]
    assert not compare_detections("d", ref, ref[:1]).passed
    # a detection at the threshold may exist on one side only
    edge = np.concatenate([ref, [[0, 3, 0.30001, 0, 0, 1, 1]]])
    assert compare_detections("d", edge, ref, threshold=0.3).passed


def test_malformed_detection_output_is_refused(cli, tmp_path):
    from fixtures import caffe_nets

    proto, model = caffe_nets.write_net("detection", tmp_path)
    r = cli("convert", proto, "--weights", model, "-o", tmp_path / "o.onnx")
    assert r.code == 4 and "needs three bottoms (mbox_loc, mbox_conf, mbox_priorbox)" in r.err
