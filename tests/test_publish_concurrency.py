"""Publishing under concurrency and crashes: real processes, a real lock, kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from fixtures.onnx_tiny import linear
from retool.publish import open_repo, publish

ROOT = Path(__file__).resolve().parents[1]


def _retool(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "retool", "-q", *map(str, args)], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_eight_processes_publish_eight_distinct_verified_versions(tmp_path):
    model = linear(tmp_path / "m.onnx", external_data_mb=2)
    repo = tmp_path / "repo"
    procs = [_retool("publish", model, "--repo", repo, "--name", "m", "--republish", "--json") for _ in range(8)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), [err for rc, _, err in results if rc]
    versions = sorted(json.loads(out)["data"]["version"] for _, out, _ in results)
    assert versions == list(range(1, 9))
    r = open_repo(repo)
    assert r.versions("m") == versions
    findings, checked = r.verify()
    assert findings == [] and checked == 8 * 4  # model, data, samples, manifest
    assert not [p for p in (repo / "m").iterdir() if p.name.startswith(".staging")]


def test_publisher_killed_mid_copy_leaves_nothing_visible(tmp_path):
    model = linear(tmp_path / "m.onnx", external_data_mb=1)
    repo = tmp_path / "repo"
    # the test hook sleeps after each staged file, so the kill lands between the data file and the model
    p = _retool("publish", model, "--repo", repo, "--name", "m", env={"RETOOL_TEST_STAGE_DELAY_S": "60",
                                                                  "TMPDIR": str(tmp_path)})
    deadline = time.time() + 60
    staged = []
    while time.time() < deadline and not staged:
        staged = list((repo / "m").glob(".staging-*/m.onnx.data")) if (repo / "m").exists() else []
        time.sleep(0.05)
    assert staged, p.stderr.read() if p.poll() is not None else "publisher never started staging"
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    assert not (staged[0].parent / "model.onnx").exists()  # it really died mid-copy
    r = open_repo(repo)
    assert [d.name for d in (repo / "m").iterdir() if d.name.isdigit()] == []
    assert r.models() == [] and r.verify() == ([], 0)
    assert not (repo / "m" / "config.pbtxt").exists()
    # the next publish works, takes version 1, and sweeps the dead publisher's staging folder
    res = publish(model, repo, "m")
    assert res.version == 1 and r.verify()[0] == []
    assert not list((repo / "m").glob(".staging-*"))
