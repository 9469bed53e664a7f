"""Start and stop a real Triton Inference Server on a model repository, and never leave one behind.

Explicit model control (models load on request), free ports on 127.0.0.1, readiness with a
timeout, stop by PID with SIGINT and --exit-timeout-secs, then SIGKILL of its process group.
A server that dies gives the reason from its own log.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

from retool.errors import ServingError, ServingTimeout, UsageError
from retool.serve.home import ensure_home, server_env

#: servers started and not yet stopped (strong references: a forgotten one is still stopped at exit)
_LIVE: "set[TritonServer]" = set()
_LOG_LINE = re.compile(r"^([EWI])\d{4} [\d:.]+ +\d+ [^\]]+\] ?(.*)$")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(port: int, host: str = "127.0.0.1", flag: str = "--http-port") -> int:
    """A port the user named must be free: say which is taken rather than let Triton die on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, int(port)))
        except OSError as exc:
            raise UsageError(f"{flag} {port}: port {port} on {host} is in use ({exc.strerror}); pick another "
                             f"or leave {flag} out to use a free one") from None
    return int(port)


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
        self.host = host
        self.http_port = check_port(http_port, host, "--http-port") if http_port else None
        self.grpc_port = check_port(grpc_port, host, "--grpc-port") if grpc_port else None
        self.load, self.model_control = tuple(load), model_control
        self.startup_timeout, self.exit_timeout = float(startup_timeout), int(exit_timeout)
        self._log_dir = Path(log_dir) if log_dir else None
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._log_fh = None

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
        home = ensure_home()
        self.http_port = self.http_port or free_port(self.host)
        self.grpc_port = self.grpc_port or free_port(self.host)
        log_dir = self._log_dir or Path(tempfile.mkdtemp(prefix="retool-triton-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"tritonserver-{self.http_port}.log"
        cmd = [str(home.server), f"--model-repository={self.repository}",
               f"--model-control-mode={self.model_control}", f"--backend-directory={home.backends}",
               f"--cache-directory={home.caches}", f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}", "--allow-metrics=false",
               f"--exit-timeout-secs={self.exit_timeout}", "--log-verbose=0", "--strict-readiness=true",
               *(f"--load-model={m}" for m in self.load), *self.extra_args]
        self._log_fh = open(self.log_path, "wb")
        # its own session: a Ctrl-C in the terminal reaches retool, which stops the server in order
        self.proc = subprocess.Popen(cmd, stdout=self._log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=server_env(), start_new_session=True, cwd=str(log_dir))
        _LIVE.add(self)
        try:
            self.wait_live(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _died(self) -> ServingError:
        reasons = log_errors(self.log_text()) or [ln.strip() for ln in self.log_text().splitlines() if ln.strip()][-2:]
        why = "; ".join(reasons) or "no message in its log"
        return ServingError(f"tritonserver exited with code {self.proc.returncode} at start-up: {why} "
                            f"(log: {self.log_path})")

    def wait_live(self, timeout: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise self._died()
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/live", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServingTimeout(f"tritonserver did not answer on {self.http_url} within {timeout:.0f} s "
                                     f"(log: {self.log_path}); raise --startup-timeout on a busy machine")
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
    """For commands that run a server: SIGTERM and SIGHUP unwind like Ctrl-C, so the server stops."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            signal.signal(sig, _on_term)
