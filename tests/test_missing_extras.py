"""A framework that is not installed gives exit 3 and the pip command that installs it."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Hide one framework from this interpreter, as if its extra were not installed.
PROBE = """
import sys
sys.modules[{hide!r}] = None
from retool.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("hide,argv,extra", [
    ("torch", ["convert", "fixtures.torch_models:cnn", "-o", "{tmp}/m.onnx"], "torch"),
    ("tensorflow", ["convert", "{tmp}/saved", "-o", "{tmp}/m.onnx"], "tensorflow"),
    ("s3fs", ["repo", "list", "s3://bucket/models"], "s3"),
    ("pytriton", ["serve", "{tmp}/saved"], "serve"),  # the Triton server files come from nvidia-pytriton
])
def test_missing_framework_exits_3_naming_the_extra(tmp_path, hide, argv, extra):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "saved_model.pb").write_bytes(b"\x08\x01")  # looks like a SavedModel folder
    argv = [a.format(tmp=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "-c", PROBE.format(hide=hide, argv=argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"pip install -c constraints.txt '.[{extra}]'" in last and "retool[" not in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.onnx").exists()
