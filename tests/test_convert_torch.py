"""retool convert for PyTorch: every source form, verification, and every bad input."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fixtures.proc import run_retool  # noqa: E402
from fixtures import torch_models as tm  # noqa: E402

CNN_INPUT = "x:float32:batch,3,32,32"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The CNN saved in each torch file form, built at test time."""
    d = tmp_path_factory.mktemp("torch_files")
    m = tm.cnn()
    x = torch.randn(2, 3, 32, 32)
    torch.jit.save(torch.jit.trace(m, x), d / "cnn_ts.pt")
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    torch.export.save(ep, d / "cnn.pt2")
    torch.save(m, d / "cnn_module.pt")
    torch.save(m.state_dict(), d / "cnn_state.pt")
    (d / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a zip archive at all")
    data = (d / "cnn_ts.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 3])
    return d


def _report(out):
    return json.loads(out.with_name(out.stem + ".report.json").read_text())


def _assert_parity_passed(out, batches=(1, 4)):
    rep = _report(out)
    assert rep["passed"] is True
    names = [c["name"] for c in rep["checks"] if c["name"].startswith("parity:")]
    for b in batches:
        assert any(n.endswith(f"@batch{b}") for n in names), names
    for c in rep["checks"]:
        if c["name"].startswith("parity:"):
            assert c["details"]["cosine"] > 0.9999 and c["details"]["max_abs"] < 1e-3
    return rep


def _onnx_model_outputs(path, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_factory_converts_with_declared_inputs_and_dynamic_batch(cli, tmp_path):
    out = tmp_path / "cnn.onnx"
    r = cli("convert", "fixtures.torch_models:cnn", "-o", out)
    assert r.code == 0, r.err
    rep = _assert_parity_passed(out)
    assert rep["artifact"]["inputs"][0]["shape"][0] == "batch"
    prov = rep["artifact"]["provenance"][0]
    assert prov["stage"] == "convert" and prov["versions"]["torch"].startswith("2.13")
    assert "torch.onnx.export" in prov["tool"] and rep["data"]["exporter"] == prov["tool"]
    # the file on disk is the one the report describes, and it computes what torch computes
    from retool.fsutil import sha256_file

    assert rep["artifact"]["sha256"] == sha256_file(out)
    x = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = tm.cnn()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_onnx_model_outputs(out, {"x": x})[0], ref, atol=1e-4, rtol=1e-3)
    assert "PASS" in r.out and "wrote" in r.out
    # the exporter's per-node stack traces are gone (most of a small file); the module scopes stay
    import onnx

    keys = {p.key for n in onnx.load(str(out)).graph.node for p in n.metadata_props}
    assert "pkg.torch.onnx.name_scopes" in keys and not keys & {"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node"}


def test_factory_with_state_dict_weights(cli, saved, tmp_path):
    # weights from a different seed must win over the factory's own initialisation
    other = tm.cnn(seed=7)
    torch.save(other.state_dict(), tmp_path / "seed7.pt")
    out = tmp_path / "w.onnx"
    r = cli("convert", "fixtures.torch_models:cnn", "--weights", tmp_path / "seed7.pt", "-o", out)
    assert r.code == 0, r.err
    x = np.ones((1, 3, 32, 32), np.float32)
    with torch.no_grad():
        ref = other(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_onnx_model_outputs(out, {"x": x})[0], ref, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("fname,extra", [("cnn_ts.pt", ["--input", CNN_INPUT]), ("cnn.pt2", [])])
def test_torchscript_and_exported_program(cli, saved, tmp_path, fname, extra):
    out = tmp_path / "m.onnx"
    r = cli("convert", saved / fname, "-o", out, *extra)
    assert r.code == 0, r.err
    _assert_parity_passed(out)


def test_pickled_module_needs_trust(cli, saved, tmp_path):
    out = tmp_path / "m.onnx"
    r = cli("convert", saved / "cnn_module.pt", "--input", CNN_INPUT, "-o", out)
    assert r.code == 2
    assert "--trust-remote-code" in r.err and "runs arbitrary code" in r.err
    assert not out.exists()
    r = cli("convert", saved / "cnn_module.pt", "--input", CNN_INPUT, "--trust-remote-code", "-o", out)
    assert r.code == 0, r.err
    _assert_parity_passed(out)


def test_state_dict_alone_says_what_to_do(cli, saved, tmp_path):
    r = cli("convert", saved / "cnn_state.pt", "--input", CNN_INPUT, "-o", tmp_path / "m.onnx")
    assert r.code == 2 and "--weights" in r.err and "factory" in r.err


@pytest.mark.parametrize("factory", ["transformer", "two_in_two_out", "embedding"])
def test_other_fixture_models(cli, tmp_path, factory):
    out = tmp_path / f"{factory}.onnx"
    r = cli("convert", f"fixtures.torch_models:{factory}", "-o", out, "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)  # --json prints the report and nothing else on stdout
    assert rep["passed"] and rep["stage"] == "convert"
    _assert_parity_passed(out)
    if factory == "transformer":  # the sequence axis stays dynamic
        assert rep["artifact"]["inputs"][0]["shape"][1] not in (7, 2)
        tokens = np.zeros((2, 11), np.int64)
        assert _onnx_model_outputs(out, {"tokens": tokens})[0].shape == (2, 5)
    if factory == "two_in_two_out":
        assert [o["name"] for o in rep["artifact"]["outputs"]] == ["output_0", "output_1"]


def test_in_memory_module_via_python_api(tmp_path):
    import retool

    art, rep = retool.convert(tm.two_in_two_out(), tmp_path / "m.onnx",
                              inputs=["image:float32:batch,3,16,16", "meta:float32:batch,4"])
    assert rep.passed and art.path.exists() and [s.name for s in art.inputs] == ["image", "meta"]


def test_example_inputs_npz(cli, tmp_path):
    np.savez(tmp_path / "ex.npz", x=np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "m.onnx"
    r = cli("convert", "fixtures.torch_models:cnn", "--example-inputs", tmp_path / "ex.npz", "-o", out)
    assert r.code == 0, r.err
    _assert_parity_passed(out)


def test_parity_failure_exits_6_and_leaves_no_model(cli, tmp_path):
    out = tmp_path / "noisy.onnx"
    r = cli("convert", "fixtures.torch_models:noisy", "-o", out)
    assert r.code == 6
    assert "parity check failed" in r.err and "FAIL" in r.out
    assert not out.exists() and not list(tmp_path.glob(".retool-tmp-*"))
    rep = _report(out)
    assert rep["passed"] is False and any(not c["passed"] for c in rep["checks"])


def test_no_verify_skips_parity(cli, tmp_path):
    out = tmp_path / "noisy.onnx"
    r = cli("convert", "fixtures.torch_models:noisy", "--no-verify", "-o", out)
    assert r.code == 0 and out.exists()
    assert "skipped" in json.dumps(_report(out))


def test_external_data_when_over_the_limit(tmp_path, monkeypatch):
    from retool.converter import torch_converter

    monkeypatch.setattr(torch_converter, "EXTERNAL_DATA_BYTES", 1000)  # the CNN's ~20 kB of weights
    import retool

    art, rep = retool.convert(tm.cnn(), tmp_path / "big.onnx", inputs=[CNN_INPUT])
    data = tmp_path / art.extra_files[0]
    assert rep.passed and data.stat().st_size > 10_000  # the conv weights live outside the model file
    assert rep.checks and not list(tmp_path.glob(".retool-tmp-*"))


# --- bad inputs: exit code, one clear line, no traceback, nothing at -o ---------------------------

BAD = [
    ("missing", ["{d}/nope.pt"], 2, "not found"),
    ("corrupt", ["{d}/corrupt.pt", "--input", CNN_INPUT], 4, "corrupt"),
    ("truncated", ["{d}/truncated.pt", "--input", CNN_INPUT], 4, "truncated"),
    ("wrong framework", ["{onnx}", "--framework", "torch"], 4, "--framework onnx"),
    ("malformed --input", ["fixtures.torch_models:cnn", "--input", "x:float32:batch,3,,32"], 2, "bad dimension"),
    ("input does not fit", ["fixtures.torch_models:cnn", "--input", "x:float32:batch,4,32,32"], 4, "channels"),
    ("unsupported op", ["fixtures.torch_models:unsupported"], 4, "unsupported operator"),
    ("no signature", ["{d}/cnn_ts.pt"], 2, "--input"),
    ("unknown framework", ["{d}/cnn_ts.pt", "--framework", "mxnet"], 2, "known:"),
]


@pytest.mark.parametrize("name,args,code,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(cli, saved, tmp_path, cnn_onnx, name, args, code, needle):
    out = tmp_path / "out.onnx"
    argv = [a.format(d=saved, onnx=cnn_onnx) for a in args]
    r = cli("convert", *argv, "-o", out)
    assert r.code == code, (r.code, r.err)
    lines = [l for l in r.err.splitlines() if l.startswith("retool: error:")]
    assert len(lines) == 1 and needle in lines[0], r.err
    assert "Traceback" not in r.err
    assert not out.exists() and not list(tmp_path.glob(".retool-tmp-*"))


def test_unwritable_output_path(cli, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            target = tmp_path / "no-such-dir" / "m.onnx"  # root ignores permissions
        else:
            target = ro / "m.onnx"
        r = cli("convert", "fixtures.torch_models:cnn", "-o", target)
        assert r.code == 2 and "choose another -o" in r.err and not target.exists()
    finally:
        ro.chmod(0o700)


@pytest.mark.slow
def test_cli_as_a_new_user_in_a_fresh_process(tmp_path):
    out = tmp_path / "cnn.onnx"
    proc = run_retool("convert", "fixtures.torch_models:cnn", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and "parity:output@batch4" in proc.stdout
    proc = run_retool("convert", tmp_path / "missing.pt", "-o", out.with_name("x.onnx"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
