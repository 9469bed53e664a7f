"""Where pipeline jobs run: a local process pool, or tasks on a Ray cluster."""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from retool.deps import require
from retool.fsutil import inside


class WorkerDied(Exception):
    """The process running a job died (killed, out of memory, crashed)."""


class LocalEngine:
    """A spawn-based process pool: fork after torch/ORT threads start is unsafe."""

    name = "local"

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))
        self._pool = self._new_pool()

    def _new_pool(self):
        from retool import console

        # workers print whole lines only (their stderr is shared) and honour the driver's -q
        return cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=console.worker_init, initargs=(console.is_quiet(),))

    def submit(self, fn: Callable, *args) -> Any:
        try:
            return self._pool.submit(fn, *args)
        except cf.process.BrokenProcessPool:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            return self._pool.submit(fn, *args)

    def wait_any(self, futures) -> list:
        done, _ = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
        return list(done)

    def result(self, fut) -> Any:
        try:
            return fut.result()
        except cf.process.BrokenProcessPool as exc:
            raise WorkerDied(str(exc) or "a worker process died") from None

    def cancel(self, fut) -> None:
        fut.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _ray_call(fn: Callable, args: tuple, ship_from: str | None, files_in: dict):
    """Runs on a Ray worker: materialise input files, run, and ship produced files back."""
    import os

    out = None
    if ship_from is not None:
        out = tempfile.mkdtemp(prefix="retool-ray-")
        for rel, data in files_in.items():
            p = Path(out) / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        args = tuple(out if a == ship_from else (str(Path(out) / Path(a).relative_to(ship_from))
                                                   if isinstance(a, str) and a.startswith(ship_from + os.sep) else a)
                     for a in args)
    try:
        result = fn(*args)
        files = {}
        if out is not None:
            for p in Path(out).rglob("*"):
                if p.is_file() and str(p.relative_to(out)) not in files_in:
                    files[str(p.relative_to(out))] = p.read_bytes()
            result = _rebase(result, out, ship_from)
        return result, files
    finally:
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)


def _rebase(obj, old: str, new: str):
    if isinstance(obj, str) and obj.startswith(old):
        return new + obj[len(old):]
    if isinstance(obj, dict):
        return {k: _rebase(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebase(v, old, new) for v in obj]
    return obj


#: seconds to wait for a TCP answer at --ray-address; Ray itself retries a closed port for minutes
RAY_CONNECT_TIMEOUT_S = 10.0


def _probe_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """UsageError (one line) unless something accepts a connection at ``address`` (host:port or ray://host:port)."""
    import socket

    from retool.errors import UsageError

    text = address.strip()
    if text in ("auto", "local"):  # Ray finds (or starts) the local cluster itself
        return
    host, sep, port = text.split("://", 1)[-1].rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--ray-address {address}: expected host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise UsageError(f"--ray-address {address}: no Ray cluster answers at {host}:{port} ({why}); start one "
                         f"with 'ray start --head' or fix the address") from None


class RayEngine:
    """Each model x target is a Ray task. Files travel through the object store, so the
    cluster's workers need no access to this machine's output folder."""

    name = "ray"

    def __init__(self, address: str | None = None, out_dir: str | None = None, workers: int | None = None):
        ray = require("ray", "ray", "run pipelines on a Ray cluster")
        self.ray = ray
        if not ray.is_initialized():
            if address:
                _probe_ray_address(address)
            kwargs = {"address": address} if address else {"num_cpus": workers or None}
            try:
                ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
                         **{k: v for k, v in kwargs.items() if v is not None})
            except (ConnectionError, TimeoutError) as exc:  # something answers there, but not Ray's GCS
                if not address:
                    raise
                from retool.errors import UsageError, first_line

                raise UsageError(f"--ray-address {address}: not a Ray cluster, or it did not answer "
                                 f"({first_line(exc, 200)}); check the address ('ray status' on the head)") from None
        # Ray retries a task whose worker died once by itself; a second death is reported.
        self._remote = ray.remote(max_retries=1)(_ray_call)
        self.out_dir = out_dir

    def submit(self, fn: Callable, *args, files_in: dict | None = None) -> Any:
        return self._remote.remote(fn, args, self.out_dir, files_in or {})

    def wait_any(self, futures) -> list:
        done, _ = self.ray.wait(list(futures), num_returns=1)
        return done

    def result(self, ref) -> Any:
        try:
            result, files = self.ray.get(ref)
        except (self.ray.exceptions.WorkerCrashedError, self.ray.exceptions.NodeDiedError) as exc:
            raise WorkerDied(str(exc).splitlines()[0]) from None
        for rel, data in files.items():
            p = inside(self.out_dir, rel)  # names come back from a worker: keep them under --out
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        return result

    def cancel(self, ref) -> None:
        self.ray.cancel(ref, force=True)

    def close(self) -> None:
        pass
