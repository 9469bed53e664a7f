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
