"""validate against real exported models: a torch source reference, and the transformer fixture."""
from __future__ import annotations

import json

import pytest

from retool.validators.core import validate


@pytest.mark.torch
def test_onnx_candidate_against_its_torch_source(cnn_onnx):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    r = validate(cnn_onnx, "fixtures.torch_models:cnn", batch_sizes=(1, 3), latency=True, runs=4, threads=1)
    assert r.passed, [c.to_dict() for c in r.failed_checks]
    ref = r.data["reference"]
    assert ref["kind"] == "torch" and "torch.set_num_threads(1)" in ref["notes"]
    assert torch.get_num_threads() == before  # pinned for the measurement only
    assert set(r.data["parity"]) == {"output@batch1", "output@batch3"}
    assert r.data["parity"]["output@batch3"]["max_abs"] < 1e-3
    assert set(r.data["latency"]["reference"]) == {"1", "3"} and set(r.data["latency"]["speedup"]) == {"1", "3"}
    assert r.data["providers"]["nodes_per_provider"]["CPUExecutionProvider"] > 0


@pytest.mark.torch
def test_wrong_torch_reference_fails_parity(cnn_onnx):
    pytest.importorskip("torch")
    from fixtures import torch_models

    r = validate(cnn_onnx, torch_models.cnn(seed=1), batch_sizes=(2,))  # other weights: a wrong model
    assert not r.passed and r.failed_checks[0].name == "parity:output@batch2"


def test_transformer_cli_with_input_override_and_reports(cli, transformer_onnx, tmp_path):
    r = cli("validate", transformer_onnx, "--reference", transformer_onnx, "--input", "tokens:int64:batch,5",
            "--batch-sizes", "1,4", "--latency", "--runs", "3", "--threads", "1", "--report-dir", tmp_path)
    assert r.code == 0, r.out + r.err
    data = json.loads((tmp_path / "report.json").read_text())["data"]
    assert data["candidate"]["inputs"] == [{"name": "tokens", "dtype": "int64", "shape": ["batch", 5]}]
    assert data["parity"]["output@batch4"]["size"] == 4 * 5  # (batch, classes)
    assert data["batch_consistency"]["output@batch4"]["passed"]
    assert {p.name for p in tmp_path.iterdir()} >= {"report.json", "report.md", "report.html"}


@pytest.mark.tensorflow
def test_onnx_candidate_against_its_keras_source_nhwc(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    from fixtures import tf_models
    from retool.converter.core import convert

    src = tf_models.save_keras(tf_models.sequential_cnn(), tmp_path / "cnn.keras")
    art, _ = convert(src, tmp_path / "cnn.onnx", options={"inputs_as_nchw": True})
    r = validate(art.path, src, batch_sizes=(1, 2), latency=True, runs=3, threads=1,
                 options={"inputs_as_nchw": True})  # the reference is fed NHWC, the candidate NCHW
    assert r.passed, [c.to_dict() for c in r.failed_checks]
    assert r.data["reference"]["kind"] == "tensorflow"
    # threads are pinned, or (TF already started in this process) the report says they could not be
    notes = r.data["reference"]["notes"]
    assert notes == ["tf intra-op threads 1, inter-op 1"] or any("could not" in w for w in r.warnings)
    assert set(r.data["latency"]["speedup"]) == {"1", "2"}


TINY_PROTOTXT = """name: "tiny"
input: "data"
input_shape { dim: 1 dim: 3 dim: 16 dim: 16 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


@pytest.mark.caffe
def test_onnx_candidate_against_its_caffe_source_run_by_opencv(tmp_path):
    cv2 = pytest.importorskip("cv2")
    from fixtures import caffe_nets
    from retool.converter.core import convert

    proto = tmp_path / "tiny.prototxt"
    proto.write_text(TINY_PROTOTXT)
    weights = caffe_nets.write_caffemodel(proto, tmp_path / "tiny.caffemodel")
    art, _ = convert(proto, tmp_path / "tiny.onnx", weights=weights)
    before = cv2.getNumThreads()
    r = validate(art.path, proto, weights=weights, batch_sizes=(1, 3), latency=True, runs=3, threads=1)
    assert r.passed, [c.to_dict() for c in r.failed_checks]
    assert r.data["reference"]["kind"] == "caffe" and r.data["reference"]["notes"] == ["cv2.setNumThreads(1)"]
    assert cv2.getNumThreads() == before
    assert set(r.data["latency"]["reference"]) == {"1", "3"}
