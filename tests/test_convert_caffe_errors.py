"""Bad Caffe inputs: one clear line on stderr, exit 4 or 2, no traceback, nothing at -o."""
from __future__ import annotations

import pytest

pytest.importorskip("cv2")
from fixtures import caffe_nets  # noqa: E402

pytestmark = pytest.mark.caffe


def _clean_failure(r, out, code=4):
    assert r.code == code, (r.code, r.err)
    lines = [l for l in r.err.splitlines() if l.startswith("retool: error:")]
    assert len(lines) == 1, r.err
    assert "Traceback" not in r.err
    assert not out.exists()
    return lines[0]


def test_missing_blob(cli, tmp_path):
    proto, _ = caffe_nets.write_net("vision", tmp_path)
    bad = caffe_nets.write_caffemodel(proto, tmp_path / "bad.caffemodel", drop_blob="fc")
    out = tmp_path / "o.onnx"
    line = _clean_failure(cli("convert", proto, "--weights", bad, "-o", out), out)
    assert "'fc'" in line and "bias" in line and "does not match the prototxt" in line


def test_wrong_shape_blob(cli, tmp_path):
    proto, _ = caffe_nets.write_net("vision", tmp_path)
    bad = caffe_nets.write_caffemodel(proto, tmp_path / "bad.caffemodel", wrong_shape="conv2")
    out = tmp_path / "o.onnx"
    line = _clean_failure(cli("convert", proto, "--weights", bad, "-o", out), out)
    assert "'conv2'" in line and "(7, 4, 3, 3)" in line and "(6, 4, 3, 3)" in line


def test_truncated_caffemodel(cli, tmp_path):
    proto, model = caffe_nets.write_net("vision", tmp_path)
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2 + 3])
    out = tmp_path / "o.onnx"
    line = _clean_failure(cli("convert", proto, "--weights", model, "-o", out), out)
    assert "vision.caffemodel" in line and ("truncated" in line or "does not match" in line)


def test_prototxt_syntax_error_names_the_line(cli, tmp_path):
    proto = tmp_path / "broken.prototxt"
    proto.write_text(caffe_nets.NETS["syntax_error"])
    out = tmp_path / "o.onnx"
    line = _clean_failure(cli("convert", proto, "-o", out), out)
    assert "broken.prototxt" in line and "syntax error" in line and "line 7" in line


def test_unknown_layer_type(cli, tmp_path):
    proto, model = caffe_nets.write_net("unknown", tmp_path)
    out = tmp_path / "o.onnx"
    line = _clean_failure(cli("convert", proto, "--weights", model, "-o", out), out)
    assert "'mystery'" in line and "'FancyNorm'" in line


def test_malformed_detection_output_fails_cleanly(cli, tmp_path):
    # DetectionOutput itself converts now (tests/test_convert_caffe_ssd.py); a malformed one still fails cleanly
    proto, model = caffe_nets.write_net("detection", tmp_path)
    out = tmp_path / "o.onnx"
    line = _clean_failure(cli("convert", proto, "--weights", model, "-o", out), out)
    assert "'detection_out'" in line and "needs three bottoms" in line


def test_caffemodel_as_source_and_missing_weights(cli, tmp_path):
    proto, model = caffe_nets.write_net("vision", tmp_path)
    out = tmp_path / "o.onnx"
    line = _clean_failure(cli("convert", model, "-o", out), out, code=2)
    assert "--weights" in line
    line = _clean_failure(cli("convert", proto, "-o", out), out, code=2)
    assert "--weights" in line and "'conv1'" in line


def test_truncated_caffemodel_in_a_real_process(tmp_path, run_retool_subprocess):
    proto, model = caffe_nets.write_net("reshape", tmp_path)
    model.write_bytes(model.read_bytes()[:-7])
    out = tmp_path / "o.onnx"
    r = run_retool_subprocess("convert", proto, "--weights", model, "-o", out)
    assert r.returncode == 4, r.stderr
    assert "Traceback" not in r.stderr
    assert [l for l in r.stderr.splitlines() if l.startswith("retool: error:")] == [
        l for l in r.stderr.splitlines() if "reshape.caffemodel" in l]
    assert not out.exists()
