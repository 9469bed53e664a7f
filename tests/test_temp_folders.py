"""retool's temporary folders carry their owner's pid, so what a kill -9 left is removed by a later retool
(retool.procs.temp_dir / clean_dead_temp), and nothing of a live or foreign process is touched."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile


def test_folders_of_dead_retools_are_removed_and_nothing_else(tmp_path, monkeypatch):
    from retool import procs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = [tmp_path / f"retool-{k}-{gone.pid}-ab_c9" for k in ("pa", "samples", "triton", "plan")]
    alive = tmp_path / f"retool-pa-{os.getpid()}-x1"
    foreign = [tmp_path / "retool-pa-k3idzndh", tmp_path / f"other-pa-{gone.pid}-x1", tmp_path / f"retool-pa-{gone.pid}"]
    for d in dead + [alive] + foreign:
        d.mkdir()
        (d / "f.csv").write_text("x")
    target = tmp_path / "keep"
    target.mkdir()
    link = tmp_path / f"retool-load-{gone.pid}-lnk"
    link.symlink_to(target)
    removed = procs.clean_dead_temp()
    assert sorted(removed) == sorted(dead) and not any(d.exists() for d in dead)
    assert alive.is_dir() and all(d.is_dir() for d in foreign) and link.is_symlink() and target.is_dir()


def test_temp_dir_names_its_owner(tmp_path, monkeypatch):
    from retool import procs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with procs.temp_dir("pa") as d:
        assert os.path.basename(d).startswith(f"retool-pa-{os.getpid()}-")
        assert procs.clean_dead_temp() == [] and os.path.isdir(d)  # its owner (this process) is alive
    assert not os.path.exists(d)


def test_a_publish_removes_what_a_killed_publish_left(tmp_path):
    """A publish killed with SIGKILL while staging leaves its samples folder; the next publish removes it."""
    import signal
    import time

    from fixtures.onnx_tiny import linear

    model = linear(tmp_path / "m.onnx", external_data_mb=0.1)
    env = {**os.environ, "TMPDIR": str(tmp_path / "t"), "RETOOL_TEST_STAGE_DELAY_S": "60"}
    (tmp_path / "t").mkdir()
    argv = [sys.executable, "-m", "retool", "-q", "publish", str(model), "--repo", str(tmp_path / "repo"), "--name", "m"]
    p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "t").glob(f"retool-samples-{p.pid}-*/*")):
        time.sleep(0.05)
    left = list((tmp_path / "t").glob(f"retool-samples-{p.pid}-*"))
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    assert left and left[0].is_dir()
    r = subprocess.run(argv, env={**env, "RETOOL_TEST_STAGE_DELAY_S": "0"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not left[0].exists() and not list((tmp_path / "t").glob("retool-*"))
