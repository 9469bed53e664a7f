"""retool optimize / retool targets from the command line: success, JSON, exit codes, one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest


def _one_error_line(r):
    lines = [l for l in r.err.splitlines() if l.startswith("retool: error:")]
    assert len(lines) == 1, r.err
    assert "Traceback" not in r.err
    return lines[0]


def test_targets_lists_profiles(cli):
    r = cli("targets")
    assert r.code == 0
    for name in ("cpu", "cpu-int8", "cpu-int8-dynamic", "arm64-int8", "gpu-fp16", "tensorrt-int8", "npu-uint8",
                 "cpu-auto"):
        assert name in r.out
    assert "per-channel" in r.out and "reduce_range" in r.out
    r = cli("targets", "--json")
    data = json.loads(r.out)
    assert {d["name"] for d in data} >= {"cpu", "cpu-int8", "npu-uint8"}
    assert all(d["does"] and "tolerance" in d for d in data)


@pytest.mark.parametrize("which", ["cnn", "transformer"])
def test_optimize_cli_json(cli, cnn_onnx, transformer_onnx, tmp_path, which):
    src = cnn_onnx if which == "cnn" else transformer_onnx
    out = tmp_path / "o.onnx"
    target = "cpu-int8" if which == "cnn" else "cpu-int8-dynamic"
    r = cli("-q", "optimize", src, "--target", target, "-o", out, "--json", "--threads", "1")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["stage"] == "optimize" and rep["passed"]
    d = rep["data"]
    assert d["target"] == target and d["latency"]["threads"] == 1 and d["latency"]["batch"] == 1
    assert rep["artifact"]["path"] == str(out) and out.exists()
    assert rep["artifact"]["provenance"][-1]["stage"] == "optimize"


def test_optimize_cli_human_summary_and_random_warning(cli, cnn_onnx, tmp_path):
    r = cli("optimize", cnn_onnx, "--target", "cpu-int8", "-o", tmp_path / "o.onnx", "--no-measure")
    assert r.code == 0, r.err
    assert "parity:output@held-out" in r.out and "wrote" in r.out
    assert "NO CALIBRATION DATA" in r.err  # loud, on stderr, and in the report
    assert "calibrating" in r.err  # progress


def test_optimize_cli_tolerance_and_fallback(cli, cnn_onnx, tmp_path):
    out = tmp_path / "strict.onnx"
    r = cli("-q", "optimize", cnn_onnx, "--target", "gpu-fp16", "-o", out, "--no-measure", "--accuracy-budget", "1",
            "--tolerance", "min_cosine=1.0,atol=0,rtol=0", "--json")
    assert r.code == 6
    line = _one_error_line(r)
    assert "was not written" in line and not out.exists()
    assert json.loads(r.out)["passed"] is False


def test_bad_inputs_exit_codes(cli, cnn_onnx, tmp_path):
    out = tmp_path / "o.onnx"
    r = cli("optimize", cnn_onnx, "--target", "cpu-int9", "-o", out)
    assert r.code == 2 and "known: cpu, cpu-int8" in _one_error_line(r)

    np.savez(tmp_path / "names.npz", image=np.zeros((2, 3, 32, 32), np.float32))
    r = cli("optimize", cnn_onnx, "--target", "cpu-int8", "-o", out, "--calibration", tmp_path / "names.npz")
    assert r.code == 2 and "missing x" in _one_error_line(r)

    np.savez(tmp_path / "shape.npz", x=np.zeros((2, 1, 32, 32), np.float32))
    r = cli("optimize", cnn_onnx, "--target", "cpu-int8", "-o", out, "--calibration", tmp_path / "shape.npz")
    assert r.code == 2 and "dim 1 must be 3" in _one_error_line(r)

    (tmp_path / "empty").mkdir()
    r = cli("optimize", cnn_onnx, "--target", "cpu-int8", "-o", out, "--calibration", tmp_path / "empty")
    assert r.code == 2 and "calibration folder has no" in _one_error_line(r)

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00\x01not onnx at all" * 10)
    r = cli("optimize", bad, "--target", "cpu", "-o", out)
    assert r.code == 2 and "ONNX" in _one_error_line(r)

    r = cli("optimize", cnn_onnx, "--target", "cpu", "-o", out, "--tolerance", "cosine=0.9")
    assert r.code == 2 and "--tolerance" in _one_error_line(r)
    assert not out.exists()
    assert not list(tmp_path.glob(".retool-tmp-*"))
