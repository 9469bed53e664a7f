"""A quantized TorchScript source (fused static int8 from torch.ao.quantization) is detected and judged by
the int8 tolerances, with the reason in the report; --atol/--rtol/--min-cosine still override (issue 23)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory):
    from fixtures import torch_scripted

    return torch_scripted.save_quantized_scripted(tmp_path_factory.mktemp("q") / "qnet.pt", seed=2)


def _report(path):
    return json.loads(path.with_name(path.stem + ".report.json").read_text())


def test_quantized_torchscript_uses_int8_tolerances(qmodel, tmp_path, cli):
    from retool.validators.parity import tolerance_for

    out = tmp_path / "q.onnx"
    r = cli("convert", qmodel, "-o", out, "--input", "x:float32:batch,3,16,16")
    assert r.code == 0, r.err
    d = _report(out)["data"]
    assert d["source_precision"] == "int8" and d["tolerance"] == tolerance_for("int8").to_dict()
    assert "quantized::conv2d_relu" in d["tolerance_reason"] and "int8 tolerances" in d["tolerance_reason"]
    # independent: the ONNX copy against the scripted source on fresh data
    import onnxruntime as ort

    x = np.random.default_rng(4).standard_normal((3, 3, 16, 16)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        ref = torch.jit.load(str(qmodel))(torch.from_numpy(x)).numpy()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 2 / 3


def test_explicit_limits_override_the_int8_defaults(qmodel, tmp_path, cli):
    out = tmp_path / "q.onnx"
    r = cli("convert", qmodel, "-o", out, "--input", "x:float32:batch,3,16,16", "--atol", "0.5", "--min-cosine", "0.9")
    assert r.code == 0, r.err
    d = _report(out)["data"]
    assert d["tolerance"]["atol"] == 0.5 and d["tolerance"]["min_cosine"] == 0.9 and d["tolerance"]["min_top1"] == 0.9
    assert d["tolerance_from"] == "int8 defaults with atol, min_cosine given"


def test_fp32_source_keeps_fp32_tolerances(tmp_path, cli):
    from fixtures import torch_scripted
    from retool.validators.parity import tolerance_for

    src = torch_scripted.save_scripted(tmp_path / "seg.pt", "namedtuple")
    out = tmp_path / "s.onnx"
    assert cli("convert", src, "-o", out, "--input", "x:float32:batch,3,32,32").code == 0
    d = _report(out)["data"]
    assert d["source_precision"] == "fp32" and d["tolerance"] == tolerance_for("fp32").to_dict()
    assert "tolerance_reason" not in d


def test_eager_quantized_module_is_detected():
    from fixtures import torch_models, torch_scripted
    from retool.converter.source_precision import torch_precision

    precision, why = torch_precision(torch, torch_scripted.quantized_eager(seed=1))
    assert precision == "int8" and "ConvReLU2d" in why
    assert torch_precision(torch, torch_models.cnn()) == ("fp32", "")
