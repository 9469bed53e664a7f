"""A pickle whose package raises at import is an environment problem (exit 3), not a corrupt file."""
import pytest

pytest.importorskip("torch")

from fixtures.broken_package import write_broken_pickle  # noqa: E402
from fixtures.proc import run_retool  # noqa: E402


def test_package_failing_at_import_exits_3_naming_it(tmp_path):
    # failed before with exit 4: "cannot load as a torch pickle (RuntimeError: ...); the file may be truncated or corrupt"
    model = write_broken_pickle(tmp_path)
    r = run_retool("convert", model.name, "--input", "x:float32:batch,4", "--trust-remote-code", "-o", "m.onnx",
                   cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("retool: error:")]
    assert len(err) == 1
    assert "needs package 'brokenvision', which is installed but fails to import" in err[0]
    assert "RuntimeError: operator brokenvision::nms does not exist" in err[0]  # the first line only
    assert "second line" not in err[0] and "corrupt" not in err[0]
    assert "python -c 'import brokenvision'" in err[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_truly_corrupt_pickle_is_still_called_corrupt(cli, tmp_path):
    model = write_broken_pickle(tmp_path)
    (tmp_path / "brokenvision" / "__init__.py").write_text("")  # the package works again
    data = model.read_bytes()
    bad = tmp_path / "bad.pt"
    i = data.index(b"data.pkl") + 40  # damage the pickle stream inside the archive
    bad.write_bytes(data[:i] + b"\xff" * 16 + data[i + 16:])
    r = run_retool("convert", bad.name, "--input", "x:float32:batch,4", "--trust-remote-code", "-o", "m.onnx",
                   cwd=tmp_path)
    assert r.returncode == 4, r.stderr
    assert "corrupt" in r.stderr and "fails to import" not in r.stderr
