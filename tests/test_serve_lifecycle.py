"""The local Triton's life: it stops without leaving a process (checked by PID), and each way it can
fail gives one line and its own exit code."""
from __future__ import annotations

import socket

import psutil
import pytest

from fixtures.onnx_tiny import linear
from fixtures.proc import run_retool
from retool.errors import ServingError, ServingTimeout, UsageError
from retool.publish import publish
from retool.serve.session import open_session
from retool.serve.server import TritonServer, free_port


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-life")
    publish(linear(root / "lin.onnx"), root / "repo", "lin", max_regression="off")
    return root / "repo"


def _gone(pids) -> bool:
    return not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_stop_leaves_neither_the_server_nor_its_python_stubs(repo):
    with open_session(str(repo)) as sess:
        sess.load("lin")
        pid = sess.server.pid
        kids = [c.pid for c in psutil.Process(pid).children(recursive=True)]
        assert kids, "a loaded python-backend model runs in a stub process"
    assert sess.server.proc.returncode == 0  # SIGINT: Triton's own orderly shutdown
    assert _gone([pid, *kids])
    assert not sess.server.log_path.parent.exists()  # its /tmp/retool-triton-* folder goes with it


def test_exception_inside_the_session_still_stops_the_server(repo):
    with pytest.raises(RuntimeError):
        with TritonServer(repo) as srv:
            pid = srv.pid
            raise RuntimeError("boom")
    assert _gone([pid])


def test_server_dying_at_startup_gives_its_logs_reason(repo):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        srv = TritonServer(repo)
        srv.grpc_port = held.getsockname()[1]  # taken after the check: the race a free port can lose
        with pytest.raises(ServingError) as ei:
            srv.start()
    assert ei.value.exit_code == 8 and "at start-up" in str(ei.value)
    assert "already in use" in str(ei.value) or "GRPC" in str(ei.value), str(ei.value)
    assert _gone([srv.pid])
    assert not srv.log_path.parent.exists()  # an error removes its temporary folder too


def test_a_model_not_ready_in_time_is_a_timeout_and_the_server_still_stops(repo):
    with pytest.raises(ServingTimeout) as ei:
        with open_session(str(repo)) as sess:
            pid = sess.server.pid
            sess.load("lin", timeout=0.05)  # a python stub takes about a second to start
    assert ei.value.exit_code == 9 and "'lin' was not ready" in str(ei.value)
    assert _gone([pid])


def test_named_port_in_use_is_a_usage_error_naming_it(repo):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        with pytest.raises(UsageError) as ei:
            TritonServer(repo, http_port=port)
        assert f"port {port}" in str(ei.value) and ei.value.exit_code == 2
        r = run_retool("serve", repo, "--http-port", port)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and f"port {port}" in r.stderr


def test_free_ports_are_free():
    p = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", p))


@pytest.mark.parametrize("cmd", [("serve",), ("repo", "check")])
def test_nonexistent_repository_is_one_line_exit_2(tmp_path, cmd):
    r = run_retool(*cmd, tmp_path / "nowhere")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "no model repository here" in r.stderr


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["interactive", "nohup"])
def test_retool_serve_prints_urls_and_stops_on_ctrl_c(repo, sigint_ignored):
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    # nohup, CI and `&` in a non-interactive shell hand SIGINT down as ignored
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    p = subprocess.Popen([sys.executable, "-m", "retool", "serve", str(repo)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=pre)
    try:
        url = None
        deadline = time.time() + 120
        while time.time() < deadline and url is None:
            line = p.stdout.readline()
            if line.strip().startswith("HTTP"):
                url = line.split()[1]
        assert url, p.stderr.read() if p.poll() is not None else "no URL printed"
        with urllib.request.urlopen(f"{url}/v2/models/lin/ready") as r:
            assert r.status == 200
        server_pids = [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
        assert server_pids
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 0  # Ctrl-C is how `retool serve` is meant to end
    finally:
        if p.poll() is None:  # retool's watchdog then stops the server and its stubs
            os.kill(p.pid, signal.SIGKILL)
            p.wait(30)
            deadline = time.time() + 20
            while not _gone(server_pids) and time.time() < deadline:
                time.sleep(0.2)
    assert _gone(server_pids)


@pytest.mark.slow
def test_a_free_port_taken_by_another_server_before_triton_binds_it_is_picked_again(repo, monkeypatch):
    """Two jobs on one runner: a port we picked can be answered by someone else's server."""
    import http.server
    import threading

    from retool.serve import server as server_mod

    class Live(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - a stranger that says "live" and names itself "triton"
            body = b'{"name": "triton"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    stranger = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Live)
    threading.Thread(target=stranger.serve_forever, daemon=True).start()
    taken = stranger.server_address[1]
    picks = iter([taken])
    real = server_mod.free_port
    monkeypatch.setattr(server_mod, "free_port", lambda host="127.0.0.1": next(picks, None) or real(host))
    try:
        with TritonServer(repo) as srv:
            assert srv.http_port != taken and srv._answers_as_us()
            first = srv.pid
    finally:
        stranger.shutdown()
    assert _gone([first])
