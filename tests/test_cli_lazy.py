"""`retool --help` must stay fast: it may import neither torch nor tensorflow."""
import json
import subprocess
import sys

import pytest

PROBE = """
import sys, json
from retool.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "tensorflow", "keras", "tf2onnx", "cv2", "ray") if m in sys.modules)
print("HEAVY=" + json.dumps(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["convert", "--help"], ["optimize", "--help"],
                                  ["validate", "--help"], ["publish", "--help"], ["run", "--help"]])
def test_help_imports_no_heavy_framework(argv):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    heavy = json.loads(proc.stderr.rsplit("HEAVY=", 1)[1])
    assert heavy == [], f"retool {' '.join(argv)} imported {heavy}"
    assert "Usage:" in proc.stdout


def test_help_lists_commands_and_exit_codes(cli):
    r = cli("--help")
    assert r.code == 0
    for name in ("convert", "optimize", "validate", "publish", "repo", "run", "targets"):
        assert name in r.out
    assert "6 validation gate failed" in r.out


def test_unknown_command_is_a_usage_error(cli):
    r = cli("frobnicate")
    assert r.code == 2


def test_a_torchscript_model_without_input_says_so_before_importing_torch(tmp_path):
    """A missing --input took 18.9 s to be reported (torch's import, then the model's load): a TorchScript
    archive that declares no inputs is read as a zip, and the error comes before any framework."""
    import torch

    path = tmp_path / "lin.pt"
    torch.jit.script(torch.nn.Linear(4, 2)).save(str(path))
    probe = PROBE.replace("    main({argv!r})", "    print('CODE=%s' % main({argv!r}), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", probe.format(argv=["convert", str(path), "-o", str(tmp_path / "o.onnx")])],
                          capture_output=True, text=True, timeout=60)
    heavy = json.loads(proc.stderr.rsplit("HEAVY=", 1)[1])
    assert "CODE=2" in proc.stderr and "--input NAME:DTYPE:SHAPE" in proc.stderr, proc.stderr
    assert heavy == [] and not (tmp_path / "o.onnx").exists()
