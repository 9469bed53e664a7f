"""Torch output names: Mapping keys, namedtuple and ModelOutput fields, nesting, --output-names.

Each case checks the names in the ONNX file and runs torch and onnxruntime itself,
matching outputs by name, independently of retool's own parity report.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fixtures import torch_structured as tst  # noqa: E402

X = "x:float32:batch,6"


def _report(out):
    return json.loads(out.with_name(out.stem + ".report.json").read_text())


def _ort(path, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def _torch_named(model, x):
    with torch.no_grad():
        out = model(torch.from_numpy(x))

    flat = {}

    def walk(v, name):
        if isinstance(v, torch.Tensor):
            flat[name] = v.numpy()
        elif isinstance(v, dict):
            for k, w in v.items():
                walk(w, f"{name}.{k}" if name else k)
        elif isinstance(v, tuple) and hasattr(v, "_fields"):
            for k, w in zip(v._fields, v):
                walk(w, f"{name}.{k}" if name else k)
        else:
            for i, w in enumerate(v):
                walk(w, f"{name}_{i}")

    walk(out, "")
    return flat


def _check(out, model, expect_names):
    x = np.random.default_rng(5).standard_normal((3, 6)).astype(np.float32)
    got = _ort(out, {"x": x})
    assert list(got) == expect_names  # names and their order
    ref = _torch_named(model, x)
    assert list(ref) == expect_names
    for n in expect_names:
        np.testing.assert_allclose(got[n], ref[n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("factory,names", [
    ("dict_out", ["scores", "features", "norm"]),
    ("namedtuple_out", ["logits", "embedding"]),
    ("hf_style_out", ["last_hidden_state", "pooler_output"]),
    ("nested_out", ["heads.cls", "heads.aux_0", "heads.aux_1", "extra_0"]),
])
def test_factory_outputs_keep_their_names(cli, tmp_path, factory, names):
    out = tmp_path / f"{factory}.onnx"
    r = cli("convert", f"fixtures.torch_structured:{factory}", "-o", out)
    assert r.code == 0, r.err
    _check(out, getattr(tst, factory)(), names)
    rep = _report(out)
    assert rep["passed"] and rep["data"]["output_names_source"] == "model"
    assert [o["name"] for o in rep["artifact"]["outputs"]] == names


@pytest.mark.parametrize("factory,names", [("dict_out", ["scores", "features", "norm"]),
                                           ("namedtuple_out", ["logits", "embedding"])])
def test_torchscript_outputs_keep_their_names(cli, tmp_path, factory, names):
    model = getattr(tst, factory)()
    path = tmp_path / f"{factory}.pt"
    torch.jit.save(torch.jit.script(model), path)
    out = tmp_path / "ts.onnx"
    r = cli("convert", path, "--input", X, "-o", out)
    assert r.code == 0, r.err
    _check(out, model, names)
    assert _report(out)["data"]["output_names_source"] == "model"


def test_pickled_module_with_model_output(cli, tmp_path):
    model = tst.hf_style_out()
    path = tmp_path / "hf.pt"
    torch.save(model, path)
    out = tmp_path / "hf.onnx"
    r = cli("convert", path, "--input", X, "--trust-remote-code", "-o", out)
    assert r.code == 0, r.err
    _check(out, model, ["last_hidden_state", "pooler_output"])


def test_output_names_flag_names_any_torch_source(cli, tmp_path):
    model = tst.namedtuple_out()
    path = tmp_path / "nt.pt"
    torch.jit.save(torch.jit.trace(model, torch.randn(2, 6)), path)  # tracing drops the field names
    out = tmp_path / "nt.onnx"
    r = cli("convert", path, "--input", X, "--output-names", "probs,emb", "-o", out)
    assert r.code == 0, r.err
    x = np.ones((2, 6), np.float32)
    got = _ort(out, {"x": x})
    assert list(got) == ["probs", "emb"]
    with torch.no_grad():
        ref = model(torch.from_numpy(x))
    np.testing.assert_allclose(got["probs"], ref.logits.numpy(), atol=1e-5)
    assert _report(out)["data"]["output_names_source"] == "--output-names"


def test_unnamed_outputs_say_so(cli, tmp_path):
    out = tmp_path / "two.onnx"
    r = cli("convert", "fixtures.torch_models:two_in_two_out", "-o", out)
    assert r.code == 0, r.err
    rep = _report(out)
    assert [o["name"] for o in rep["artifact"]["outputs"]] == ["output_0", "output_1"]
    assert rep["data"]["output_names_source"] == "positional"


@pytest.mark.parametrize("names,needle", [("a", "gives 1 name(s) but the model has 3 output(s): scores, features, norm"),
                                          ("a,a,b", "distinct"), ("x,b,c", "differ from the input names")])
def test_bad_output_names(cli, tmp_path, names, needle):
    out = tmp_path / "bad.onnx"
    r = cli("convert", "fixtures.torch_structured:dict_out", "--output-names", names, "-o", out)
    assert r.code == 2 and needle in r.err, r.err
    assert not out.exists()
