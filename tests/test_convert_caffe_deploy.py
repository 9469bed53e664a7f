"""The BVLC AlexNet and SqueezeNet 1.1 deploy files, with synthetic caffemodels, convert with parity."""
from __future__ import annotations

import json
import time
from pathlib import Path

import onnx
import pytest

pytest.importorskip("cv2")
from fixtures import caffe_nets  # noqa: E402

pytestmark = pytest.mark.caffe


def _deploy(name: str) -> Path:
    return caffe_nets.REFERENCE / name  # shipped in fixtures/, so these run from a clone


def test_squeezenet_deploy_converts_with_parity(cli, tmp_path):
    proto = _deploy("squeezenet_v1.1_deploy.prototxt")
    model = caffe_nets.write_caffemodel(proto, tmp_path / "squeezenet.caffemodel", seed=1)
    out = tmp_path / "squeezenet.onnx"
    r = cli("convert", proto, "--weights", model, "-o", out, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert [c["name"] for c in report["checks"] if c["name"].startswith("parity")] == \
        ["parity:prob@batch1", "parity:prob@batch4"]
    assert all(c["passed"] for c in report["checks"])
    m = onnx.load(str(out))
    assert [o.name for o in m.graph.output] == ["prob"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.slow
def test_alexnet_deploy_250mb_converts_with_parity_in_a_subprocess(tmp_path, run_retool_subprocess):
    """~244 MB of weights: written, parsed (protobuf's C backend) and checked against OpenCV."""
    from retool.converter.caffe.reader import read_caffemodel

    proto = _deploy("bvlc_alexnet_deploy.prototxt")
    model = caffe_nets.write_caffemodel(proto, tmp_path / "alexnet.caffemodel", seed=2)
    t0 = time.perf_counter()
    net = read_caffemodel(model)
    parse_s = time.perf_counter() - t0
    print(f"parsed {model.stat().st_size / 1e6:.0f} MB caffemodel in {parse_s:.2f}s")  # measured, not asserted
    assert len(net.layer) > 8
    del net
    out = tmp_path / "alexnet.onnx"
    r = run_retool_subprocess("convert", proto, "--weights", model, "-o", out, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert all(c["passed"] for c in report["checks"])
    assert report["artifact"]["outputs"][0]["name"] == "prob"
