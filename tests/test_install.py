"""The install: the wheel a user's `pip install .` builds carries every file retool needs, and says nothing
alarming while it does."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_builds_without_setuptools_warnings_and_carries_the_triton_backend(tmp_path):
    # build from a copy, so the checkout gets no build/ or egg-info
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("retool", "converter", "optimizers", "validators"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                        "--no-cache-dir", str(src), "-w", str(out)], capture_output=True, text=True, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "absent from the `packages` configuration" not in log and "BuildBackendWarning" not in log, log[-3000:]
    (wheel,) = out.glob("retool-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "retool/serve/backends/onnxruntime/model.py" in names
    assert "retool/schemas/report.schema.json" in names
