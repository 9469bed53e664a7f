"""ExportedPrograms (.pt2): keyword inputs, static batches, range constraints.

Parity is checked here by running the program and onnxruntime directly.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fixtures import torch_structured as tst  # noqa: E402


def _report(out):
    return json.loads(out.with_name(out.stem + ".report.json").read_text())


def _ort(path, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {o.name: v for o, v in zip(sess.get_outputs(), sess.run(None, feeds))}, sess


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pt2")
    return {"kwargs": tst.save_kwargs_pt2(d / "kw.pt2"), "static": tst.save_static_pt2(d / "static.pt2"),
            "ranged": tst.save_ranged_pt2(d / "ranged.pt2"), "dir": d}


def test_keyword_inputs_are_called_as_exported(cli, programs, tmp_path):
    # failed before with: Ran into a kwarg keyword mismatch: Got the following keywords [] but expected [...]
    out = tmp_path / "kw.onnx"
    r = cli("convert", programs["kwargs"], "-o", out)
    assert r.code == 0, r.err
    rep = _report(out)
    assert rep["passed"] and rep["data"]["static_batch"] is False
    assert [i["name"] for i in rep["artifact"]["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    rng = np.random.default_rng(1)
    feeds = {"input_ids": rng.integers(0, 30, (3, 9)), "attention_mask": rng.integers(0, 2, (3, 9)),
             "token_type_ids": rng.integers(0, 2, (3, 9))}
    got, _ = _ort(out, feeds)
    assert list(got) == ["logits", "last_hidden_state"]
    ep = torch.export.load(str(programs["kwargs"]))
    with torch.no_grad():
        ref = ep.module()(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    for k in got:
        np.testing.assert_allclose(got[k], ref[k].numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 4])
def test_static_batch_with_example_inputs(cli, programs, tmp_path, batch):
    # failed before with: Guard failed: x.size()[0] == 1 (the examples marked axis 0 as dynamic)
    x = np.random.default_rng(2).standard_normal((batch, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "ex.npz", x=x)
    out = tmp_path / "static.onnx"
    r = cli("convert", programs["static"], "--example-inputs", tmp_path / "ex.npz", "-o", out)
    assert r.code == 0, r.err
    rep = _report(out)
    assert rep["passed"] and rep["data"]["static_batch"] is True and rep["data"]["verified_batch_sizes"] == [1]
    assert rep["artifact"]["inputs"][0]["shape"] == [1, 3, 8, 8]
    assert any("static" in w for w in rep["warnings"]) == (batch != 1)
    got, _ = _ort(out, {"x": x[:1]})
    ep = torch.export.load(str(programs["static"]))
    with torch.no_grad():
        ref = ep.module()(torch.from_numpy(x[:1])).numpy()
    np.testing.assert_allclose(got["output"], ref, atol=1e-5, rtol=1e-4)


def test_range_constraints_choose_the_verified_batches(cli, programs, tmp_path):
    out = tmp_path / "ranged.onnx"
    r = cli("convert", programs["ranged"], "-o", out)
    assert r.code == 0, r.err
    rep = _report(out)
    assert rep["data"]["batch_range"] == [2, 3] and rep["data"]["verified_batch_sizes"] == [2, 3]
    names = [c["name"] for c in rep["checks"] if c["name"].startswith("parity:")]
    assert names == ["parity:output@batch2", "parity:output@batch3"]
    x = np.random.default_rng(3).standard_normal((3, 3, 8, 8)).astype(np.float32)
    got, _ = _ort(out, {"x": x})
    with torch.no_grad():
        ref = torch.export.load(str(programs["ranged"])).module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got["output"], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("args,needle", [
    (["--input", "x:float32:batch,3,9,9"], "the program was exported for x:float32:1,3,8,8"),
    (["--input", "y:float32:1,3,8,8"], "the program has no input of that name"),
])
def test_input_flags_cannot_change_a_program(cli, programs, tmp_path, args, needle):
    out = tmp_path / "bad.onnx"
    r = cli("convert", programs["static"], *args, "-o", out)
    assert r.code == 2 and needle in r.err, r.err
    assert not out.exists()


def test_example_inputs_of_the_wrong_shape(cli, programs, tmp_path):
    np.savez(tmp_path / "ex.npz", x=np.zeros((1, 3, 9, 9), np.float32))
    r = cli("convert", programs["static"], "--example-inputs", tmp_path / "ex.npz", "-o", tmp_path / "m.onnx")
    assert r.code == 2 and "has shape [1, 3, 9, 9], but the program was exported for x:float32:1,3,8,8" in r.err


def test_a_program_that_fixes_the_sequence_says_so(cli, programs, tmp_path):
    src = tst.save_lstm_pt2(programs["dir"] / "lstm.pt2", seq=6)
    out = tmp_path / "lstm.onnx"
    r = cli("convert", src, "-o", out)
    assert r.code == 0, r.err
    rep = _report(out)
    note = next(w for w in rep["warnings"] if "fixes" in w)
    assert "tokens: axis 1 = 6" in note and "torch.export.Dim" in note
    assert rep["artifact"]["provenance"][0]["params"]["fixed_axes"] == {"tokens": {"1": 6}}
    _, sess = _ort(out, {"tokens": np.zeros((3, 6), np.int64)})
    assert sess.get_inputs()[0].shape == ["batch", 6]


def test_an_image_program_is_not_said_to_fix_its_image_axes(cli, programs, tmp_path):
    out = tmp_path / "ranged.onnx"
    assert cli("convert", programs["ranged"], "-o", out).code == 0
    assert not any("fixes" in w for w in _report(out)["warnings"])
