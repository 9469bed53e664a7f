"""Noise: progress lines never run together, workers announce their own start, -q/--json anywhere,
torch's internal FutureWarning hidden, every shipped data folder declared as a package."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_line_printed_inside_a_step_does_not_run_into_it(capsys):
    from retool import console

    console.set_quiet(False)
    with console.step("outer"):
        console.info("• another line")
        with console.step("inner"):
            pass
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "• outer …"  # ended before the other line, not "… • another line"
    assert "• inner … done" in err and err.rstrip().splitlines()[-1].startswith("• outer … done")


def test_q_and_json_work_before_and_after_the_subcommand(tmp_path, cli):
    from fixtures.onnx_tiny import linear

    m = linear(tmp_path / "t.onnx")
    r = cli("validate", m, "-q")
    assert r.code == 0 and "•" not in r.err
    r = cli("--json", "validate", m)
    assert r.code == 0 and json.loads(r.out)["stage"] == "validate"
    r = cli("-q", "validate", m, "--json")
    assert r.code == 0 and json.loads(r.out)["stage"] == "validate" and "•" not in r.err


@pytest.mark.slow
def test_pipeline_workers_print_whole_lines_and_start_one_at_a_time(tmp_path):
    from fixtures import onnx_models

    a, b = onnx_models.linear(tmp_path / "a.onnx"), onnx_models.linear(tmp_path / "b.onnx", seed=1)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(json.dumps({"version": 1, "models": [
        {"name": n, "source": str(p), "targets": ["cpu"], "validation": {"latency": False},
         "publish": {"when": "never"}} for n, p in (("a", a), ("b", b))]}))
    proc = subprocess.run([sys.executable, "-m", "retool", "run", str(cfg), "--out", str(tmp_path / "out"),
                           "--workers", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert not [ln for ln in lines if ln.count("•") > 1], proc.stderr  # nothing ran together
    started = [i for i, ln in enumerate(lines) if ln.endswith(": convert started")]
    a_work = [i for i, ln in enumerate(lines) if "a.onnx" in ln]  # a's own progress, from the worker
    # one worker: b is announced when it starts, after a's work, not with a at submit time
    assert len(started) == 2 and a_work and started[0] < a_work[0] < started[1], proc.stderr
    quiet = subprocess.run([sys.executable, "-m", "retool", "-q", "run", str(cfg), "--out", str(tmp_path / "o2"),
                            "--workers", "1", "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0 and "•" not in quiet.stderr, quiet.stderr  # -q reaches the workers


@pytest.mark.slow
def test_torch_convert_prints_no_internal_futurewarning(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "retool", "-q", "convert", "fixtures.torch_models:cnn",
                           "-o", str(tmp_path / "m.onnx"), "--no-verify"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "FutureWarning" not in proc.stderr and "reduce_op" not in proc.stderr


def test_every_data_folder_in_a_package_is_declared():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, dirs = set(cfg["packages"]), cfg["package-dir"]
    for pkg in list(packages):
        folder = ROOT / dirs.get(pkg, pkg.replace(".", "/"))
        for sub in folder.iterdir():
            if sub.is_dir() and not sub.name.startswith((".", "__")) and any(sub.glob("*.json")):
                assert f"{pkg}.{sub.name}" in packages, f"{pkg}.{sub.name} ships data: declare it"
                assert f"{pkg}.{sub.name}" in cfg["package-data"]


def test_in_whole_lines_mode_a_step_writes_one_line_at_its_end(capsys):
    """The pipeline driver's own steps (staging a publish) while workers print to the same stderr."""
    from retool import console

    console.set_quiet(False)
    with console.whole_lines():
        with console.step("staging"):
            assert capsys.readouterr().err == ""  # nothing left open for a worker's line to join
    err = capsys.readouterr().err
    assert err.startswith("• staging … done (") and err.endswith("\n") and err.count("\n") == 1
