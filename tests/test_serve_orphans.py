"""A kill -9 of retool leaves no tritonserver, no python stub, no perf_analyzer and no temporary
folder behind; a retool serve that inherited SIGINT as ignored still stops on it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from fixtures.onnx_tiny import linear
from fixtures.proc import ROOT
from fixtures.proctree import descendants as _descendants
from fixtures.proctree import using as _using
from fixtures.proctree import wait_gone as _wait_gone
from retool.publish import publish


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("orphans")
    publish(linear(root / "lin.onnx"), root / "repo", "lin", max_regression="off")
    return root / "repo"


def _retool(*args, ignore_sigint=False, cwd=None) -> subprocess.Popen:
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen([sys.executable, "-m", "retool", *map(str, args)], cwd=cwd or ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=pre,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def _wait_for(pid: int, names: set[str], seconds: float = 180) -> dict[int, str]:
    """Descendants of ``pid`` once every name in ``names`` runs among them."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        kids = _descendants(pid)
        if names <= {n[:15] for n in kids.values()}:
            return kids
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.2)
    raise AssertionError(f"{names} never ran under retool (pid {pid}); have {_descendants(pid)}")


def _serve_urls(p: subprocess.Popen) -> dict[str, str]:
    seen = {}
    for line in p.stdout:
        parts = line.split()
        if parts and parts[0] in ("HTTP", "log"):
            seen[parts[0]] = parts[1]
        if "log" in seen:
            return seen
    raise AssertionError(f"retool serve printed no URL: {p.stderr.read()}")


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    p.wait(30)


@pytest.mark.slow
def test_kill_9_of_retool_serve_leaves_no_server_stub_or_folder(repo):
    p = _retool("serve", repo)
    try:
        urls = _serve_urls(p)
        kids = _wait_for(p.pid, {"tritonserver", "triton_python_b"})
        assert Path(urls["log"]).parent.is_dir()
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        left = _wait_gone(kids)
        assert not left, {pid: kids[pid] for pid in left}
        assert not Path(urls["log"]).parent.exists()  # the watchdog removes it too
    finally:
        _kill(p)


def _kill_while_measuring(p: subprocess.Popen) -> None:
    """SIGKILL ``p`` once its server, stub and perf_analyzer run; none of them may be left."""
    try:
        kids = _wait_for(p.pid, {"tritonserver", "triton_python_b", "perf_analyzer"})
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        left = _wait_gone(kids)
        assert not left, {pid: kids[pid] for pid in left}
    finally:
        _kill(p)


@pytest.mark.slow
def test_kill_9_of_retool_loadtest_leaves_no_perf_analyzer_or_server(repo, tmp_path):
    _kill_while_measuring(_retool("loadtest", repo, "lin", "--concurrency", "1,1,1,1", "--window-ms", "5000",
                                  "--out", tmp_path / "lt", cwd=tmp_path))


@pytest.mark.slow
def test_serve_started_with_sigint_ignored_still_stops_on_ctrl_c(repo):
    p = _retool("serve", repo, ignore_sigint=True)
    try:
        urls = _serve_urls(p)
        kids = _wait_for(p.pid, {"tritonserver", "triton_python_b"})
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 0, p.stderr.read()
    finally:
        _kill(p)
    assert not _wait_gone(kids, 5)
    assert not Path(urls["log"]).parent.exists()


def test_a_start_removes_folders_of_dead_retools_only(repo):
    from retool.serve.server import TritonServer

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = Path(tempfile.mkdtemp(prefix=f"retool-triton-{gone.pid}-"))
    mine = Path(tempfile.mkdtemp(prefix=f"retool-triton-{os.getpid()}-"))
    try:
        with TritonServer(repo) as srv:
            folder = srv.log_path.parent
            assert folder.is_dir()
        assert not folder.exists()
        assert not dead.exists()
        assert mine.exists()  # this process is alive: its folder may be in use
    finally:
        for d in (dead, mine):
            if d.exists():
                d.rmdir()


@pytest.mark.slow
def test_perf_analyzer_dies_with_retool_even_while_the_server_lives(repo):
    from retool.serve.session import open_session

    with open_session(str(repo)) as sess:
        sess.load("lin")
        code = ("import sys; from retool.serve import loadtest as lt; "
                "lt.run_point('lin', sys.argv[1], concurrency=1, window_ms=20000)")
        p = subprocess.Popen([sys.executable, "-c", code, sess.grpc_url], cwd=ROOT)
        try:
            kids = _wait_for(p.pid, {"perf_analyzer"}, 60)
            os.kill(p.pid, signal.SIGKILL)
            p.wait(30)
            assert not _wait_gone(kids, 10), kids
            assert sess.server.alive()  # it was not the server going away that ended it
        finally:
            _kill(p)


@pytest.mark.slow
def test_kill_9_of_repo_check_while_the_server_starts_leaves_nothing(repo, tmp_path):
    own = tmp_path / "repo"  # a repository only this test serves, so that leftovers can be found by path
    import shutil

    shutil.copytree(repo, own)
    p = _retool("repo", "check", own)
    try:
        kids = _wait_for(p.pid, {"tritonserver"}, 120)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        assert not _wait_gone(kids), kids
        time.sleep(1)  # a stub forked at the last moment would show up by now
        assert not _wait_gone(_using(own), 10)
    finally:
        _kill(p)


@pytest.mark.slow
def test_kill_9_of_retool_plan_while_it_measures_leaves_nothing(repo, tmp_path):
    # the plan's Triton is started with the CPU affinity of one replica: a second path to a server
    _kill_while_measuring(_retool("plan", repo, "lin", "--budget-p99-ms", "1000", "--rate", "50", "--window-ms",
                                  "5000", "--space", "small", "--out", tmp_path / "plan", cwd=tmp_path))
    assert not (tmp_path / "plan").exists()  # nothing half-written
