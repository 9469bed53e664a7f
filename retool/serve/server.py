"""Start and stop a real Triton Inference Server on a model repository, and never leave one behind.

Explicit model control (models load on request), free ports on 127.0.0.1, readiness with a
timeout, stop by PID with SIGINT and --exit-timeout-secs, then SIGKILL of its process group.
A server that dies gives the reason from its own log.

Even a ``kill -9`` of retool leaves nothing: the server gets PR_SET_PDEATHSIG, and a watchdog
process holding a pipe from retool kills the server's process group (its python stubs survive
a SIGKILLed server) and removes its temporary folder when that pipe closes without a word.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from retool.errors import ServingError, ServingTimeout, UsageError
from retool.procs import clean_dead_temp, die_with_parent, temp_prefix
from retool.serve.home import ensure_home, server_env

#: servers started and not yet stopped (strong references: a forgotten one is still stopped at exit)
_LIVE: "set[TritonServer]" = set()
_LOG_LINE = re.compile(r"^([EWI])\d{4} [\d:.]+ +\d+ [^\]]+\] ?(.*)$")
_PORT_TRIES = 3
_IN_USE = re.compile(r"already in use|Address in use|EADDRINUSE", re.I)
_STOPPED = b"stopped"
#: run by a separate interpreter: it outlives a SIGKILLed retool just long enough to clean up
_WATCHDOG = """
import os, shutil, signal, sys
for s in (signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
pgid, folder, said = int(sys.argv[1]), sys.argv[2], b""
while True:
    try:
        chunk = os.read(0, 64)
    except InterruptedError:
        continue
    if not chunk:
        break
    said += chunk
if b"stopped" not in said:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
"""


def check_host(host: str) -> str:
    """--host must be an IPv4 address (or name) of this machine: say so, not that a port is in use."""
    try:
        addr = socket.getaddrinfo(host or None, 0, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0][4][0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"--host {host}: not an IPv4 address or known host name ({getattr(exc, 'strerror', exc)}); "
                         f"give one of this machine's addresses such as 127.0.0.1 or 0.0.0.0") from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, 0))
        except OSError as exc:
            raise UsageError(f"--host {host}: not an address of this machine ({exc.strerror}); give one of its "
                             f"addresses such as 127.0.0.1, or 0.0.0.0 for all") from None
    return host


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(port: int, host: str = "127.0.0.1", flag: str = "--http-port") -> int:
    """A port the user named must be valid and free: say which is taken rather than let Triton die on it."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"{flag} {port}: a port is a whole number from 1 to 65535; pick one or leave {flag} out "
                         f"to use a free one")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(f"{flag} {port}: port {port} on {host} is in use ({exc.strerror}); pick another "
                                 f"or leave {flag} out to use a free one") from None
            raise UsageError(f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror}); pick another port "
                             f"or leave {flag} out to use a free one") from None
    return port


def positive_seconds(value, flag: str) -> float:
    """A timeout is a finite number of seconds above 0 (0 never means 'the default')."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not math.isfinite(v) or v <= 0:
        raise UsageError(f"{flag} {value}: a timeout is a number of seconds above 0, such as 120")
    return v


def log_errors(text: str, model: str | None = None, limit: int = 3) -> list[str]:
    """Triton's error lines (E....), without the timestamp prefix; about ``model`` first when given."""
    errs = []
    for line in text.splitlines():
        m = _LOG_LINE.match(line.strip())
        if m and m.group(1) == "E":
            errs.append(m.group(2).strip().strip('"'))
        elif line.startswith("error: "):  # argument errors before logging starts
            errs.append(line[7:].strip())
    if model:
        about = [e for e in errs if f"'{model}'" in e or f"{model}:" in e]
        errs = about or errs
    # the CUDA/NVML complaints on a CPU-only machine are harmless noise, not a reason
    real = [e for e in errs if not re.search(r"CUDA|cuda|NVML|nvml|DCGM|GPU metrics|pinned memory", e)]
    return (real or errs)[-limit:]


class _PortTaken(ServingError):
    """Our server could not have the port it was given (internal: start() picks others)."""


class TritonServer:
    """``with TritonServer(repo) as srv:`` starts, waits for readiness, and always stops."""

    def __init__(self, repository, *, http_port: int | None = None, grpc_port: int | None = None,
                 host: str = "127.0.0.1", load: Sequence[str] = (), model_control: str = "explicit",
                 startup_timeout: float = 60.0, exit_timeout: int = 10, log_dir=None,
                 extra_args: Sequence[str] = ()):
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise UsageError(f"{repository}: no model repository here (not a folder); check the path or "
                             f"publish to it first")
        self.host = check_host(host)
        self.http_port = check_port(http_port, host, "--http-port") if http_port is not None else None
        self.grpc_port = check_port(grpc_port, host, "--grpc-port") if grpc_port is not None else None
        self.load, self.model_control = tuple(load), model_control
        self.startup_timeout = positive_seconds(startup_timeout, "--startup-timeout")
        self.exit_timeout = int(exit_timeout)
        self._log_dir = Path(log_dir) if log_dir else None
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._log_fh = None
        self._tmp_dir: Path | None = None  # ours to remove when the server stops
        self._watchdog: subprocess.Popen | None = None
        self._watch_fd: int | None = None
        self.server_id: str | None = None  # Triton's --id: tells our server from another on the same port

    # -- addresses -----------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_text(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return ""

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "TritonServer":
        # ports we picked can be taken by another process before Triton binds them (two CI jobs on one
        # runner): then pick again; a port the user named is never changed
        auto = self.http_port is None and self.grpc_port is None
        for attempt in range(_PORT_TRIES):
            try:
                return self._start_once()
            except _PortTaken as exc:
                if not auto or attempt == _PORT_TRIES - 1:
                    raise ServingError(f"{exc}; leave --http-port/--grpc-port out to use free ones, or stop "
                                       f"what holds the port") from None
                self.http_port = self.grpc_port = None
        raise AssertionError("unreachable")

    def _start_once(self) -> "TritonServer":
        home = ensure_home()
        self.http_port = self.http_port or free_port(self.host)
        self.grpc_port = self.grpc_port or free_port(self.host)
        self.server_id = f"retool-{os.getpid()}-{os.urandom(4).hex()}"
        clean_dead_temp()  # folders of retools that are gone (a kill -9 that even the watchdog missed)
        if self._log_dir is None:  # the owner's pid in the name: a later start can tell a dead one
            self._tmp_dir = log_dir = Path(tempfile.mkdtemp(prefix=temp_prefix("triton")))
        else:
            log_dir = self._log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"tritonserver-{self.http_port}.log"
        cmd = [str(home.server), f"--model-repository={self.repository}",
               f"--model-control-mode={self.model_control}", f"--backend-directory={home.backends}",
               f"--cache-directory={home.caches}", f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}", "--allow-metrics=false",
               f"--id={self.server_id}",
               f"--exit-timeout-secs={self.exit_timeout}", "--log-verbose=0", "--strict-readiness=true",
               *(f"--load-model={m}" for m in self.load), *self.extra_args]
        self._log_fh = open(self.log_path, "wb")
        # its own session: a Ctrl-C in the terminal reaches retool, which stops the server in order
        self.proc = subprocess.Popen(cmd, stdout=self._log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=server_env(), start_new_session=True, cwd=str(log_dir),
                                     preexec_fn=die_with_parent())
        _LIVE.add(self)
        try:
            self._start_watchdog()
            self.wait_live(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_watchdog(self) -> None:
        """A process that kills the server's group (tritonserver and its python stubs) if retool dies."""
        rfd, wfd = os.pipe()  # both non-inheritable: only the watchdog's stdin holds the read end
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(self.proc.pid), str(self._tmp_dir or "")],
                stdin=rfd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                cwd="/")
        except OSError:  # PDEATHSIG still covers the server itself
            os.close(wfd)
            wfd = None
        finally:
            os.close(rfd)
        self._watch_fd = wfd

    def _end_watchdog(self) -> None:
        if self._watch_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._watch_fd, _STOPPED)
            os.close(self._watch_fd)
            self._watch_fd = None
        if self._watchdog is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(10)
            self._watchdog = None

    def reason(self) -> str:
        """Why the server failed, from its log (read before the log goes away with the server)."""
        text = self.log_text()
        reasons = log_errors(text) or [ln.strip() for ln in text.splitlines() if ln.strip()][-2:]
        return "; ".join(reasons) or "no message in its log"

    def _died(self) -> ServingError:
        msg = f"tritonserver exited with code {self.proc.returncode} at start-up: {self.reason()}"
        return _PortTaken(msg) if _IN_USE.search(self.log_text()) else ServingError(msg)

    def _answers_as_us(self) -> bool:
        """Is the server on our port ours? Another one that took the port would also say 'live'."""
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.http_url}/v2", timeout=2) as r:
            return json.loads(r.read() or b"{}").get("name") == self.server_id

    def wait_live(self, timeout: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise self._died()
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/live", timeout=2) as r:
                    live = r.status == 200
                if live and self._answers_as_us():
                    return
                if live:
                    raise _PortTaken(f"tritonserver could not take {self.http_url}: another server answers there")
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ServingTimeout(f"tritonserver did not answer on {self.http_url} within {timeout:g} s "
                                     f"(its log: {self.reason()[:300]}); raise --startup-timeout on a busy machine")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGINT to the PID, wait --exit-timeout-secs (+ a margin), then SIGKILL its process group."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(self.exit_timeout + 5)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # python stubs of a killed server must not linger
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if self._log_fh:
            self._log_fh.close()
            self._log_fh = None
        self._end_watchdog()
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None
        _LIVE.discard(self)
        return proc.returncode

    def __enter__(self) -> "TritonServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop_all() -> None:
    for srv in list(_LIVE):
        with contextlib.suppress(Exception):
            srv.stop()


atexit.register(_stop_all)


def _on_term(signum, frame):  # SIGTERM ends retool like Ctrl-C: servers stop in the finally blocks
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """For commands that run a server: Ctrl-C, SIGTERM and SIGHUP unwind, so the server stops.

    SIGINT is set even when inherited as ignored (nohup, CI, ``&`` from a non-interactive shell),
    or such a ``retool serve`` could not be stopped with it. An ignored SIGHUP stays ignored: that
    is what nohup asks for."""
    with contextlib.suppress(ValueError, OSError):  # not the main thread
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _on_term)
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            signal.signal(signal.SIGHUP, _on_term)
