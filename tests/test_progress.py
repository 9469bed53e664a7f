"""Progress on stderr: every step line names its job's model and target, a cached rerun says `cached` once,
a terminal gets a live bar (tqdm) and anything else plain lines, and -q prints nothing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from retool import console

ROOT = Path(__file__).resolve().parents[1]


def test_step_lines_name_the_job_and_stay_plain_when_stderr_is_not_a_terminal(capsys):
    with console.labelled("torch-cnn/cpu-int8"):
        with console.step("timing batch 8 (2 threads)"):
            pass
        with console.step("torch-cnn/cpu-int8: already named"):
            pass
    with console.step("no job"):
        pass
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0].startswith("• torch-cnn/cpu-int8: timing batch 8 (2 threads) … done (")
    assert lines[1].startswith("• torch-cnn/cpu-int8: already named … done (")
    assert lines[2].startswith("• no job … done (") and "\r" not in err


def test_quiet_prints_no_step(capsys):
    console.set_quiet(True)
    try:
        with console.step("hidden"):
            pass
    finally:
        console.set_quiet(False)
    assert capsys.readouterr().err == ""


PTY_PROBE = """
import sys, time
from retool import console
console.set_quiet({quiet})
with console.labelled("m/t"):
    with console.step("exporting", estimate_s=2):
        time.sleep(1.2)
"""


def _on_a_terminal(code: str) -> str:
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            cwd=ROOT)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0, out
    return out.decode()


def test_a_terminal_gets_a_live_bar_then_one_done_line():
    out = _on_a_terminal(PTY_PROBE.format(quiet=False))
    assert "\r• m/t: exporting " in out and "left)" in out  # redrawn in place, with the time left
    assert out.count("• m/t: exporting … done (") == 1
    assert _on_a_terminal(PTY_PROBE.format(quiet=True)) == ""


@pytest.mark.slow
def test_a_pipeline_names_model_and_target_on_each_step_and_says_cached_once(tmp_path, capfd):
    import retool
    from fixtures import onnx_models

    src = onnx_models.linear(tmp_path / "lin.onnx", seed=1)
    cfg = tmp_path / "retool.yaml"
    cfg.write_text(yaml.safe_dump({
        "version": 1, "repository": str(tmp_path / "repo"),
        "defaults": {"validation": {"batch_sizes": [1], "threads": 1, "latency": True, "runs": 5},
                     "gates": {"not_slower": False}},
        "models": [{"name": "lin", "source": str(src), "targets": ["cpu"]}]}, sort_keys=False))
    assert retool.run(cfg, out=tmp_path / "out", workers=1).exit_code == 0
    first = capfd.readouterr().err
    steps = [ln for ln in first.splitlines() if ln.startswith("• ") and " … " in ln]
    assert steps and [ln for ln in steps if not ln.startswith(("• lin: ", "• lin/cpu: "))] == []
    assert any(ln.startswith("• lin/cpu: timing batch 1") for ln in steps), steps
    assert retool.run(cfg, out=tmp_path / "out", workers=1).exit_code == 0
    again = capfd.readouterr().err
    assert again.count("lin/cpu: cached") == 1 and again.count("lin: convert cached") == 1, again
