"""A Triton home of retool's own: the real server from the nvidia-pytriton wheel, plus retool's backend.

The wheel ships Triton 2.51 (bin/tritonserver, caches, the python backend and one python backend
stub per Python version). Triton's C++ onnxruntime backend is on no registry, so the home gets
retool's Python-based ``backends/onnxruntime/model.py`` instead (see docs/serving.md).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from retool.errors import MissingDependency, UsageError

#: what `make install` adds with --no-deps (their wheels pin numpy<2 for Python code retool never imports)
SERVER_WHEEL = "nvidia-pytriton==0.7.0"
PERF_WHEEL = "tritonclient==2.51.0"
BACKEND_SRC = Path(__file__).parent / "backends" / "onnxruntime" / "model.py"


def cache_dir() -> Path:
    """retool's cache: $RETOOL_CACHE_DIR, else $XDG_CACHE_HOME/retool, else ~/.cache/retool."""
    env = os.environ.get("RETOOL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retool"


def _install_hint(what: str) -> MissingDependency:
    err = MissingDependency(what, "serve", "run a local Triton Inference Server")
    err.message = (f"{what} is needed to run a local Triton Inference Server but is not installed; run: "
                   f"pip install -c constraints.txt '.[serve]' (from the checkout) && pip install --no-deps {SERVER_WHEEL} {PERF_WHEEL} "
                   f"(or give --url of a running Triton)")
    return err


def wheel_root() -> Path:
    """site-packages/pytriton/tritonserver of the installed nvidia-pytriton wheel (never imported)."""
    spec = importlib.util.find_spec("pytriton")  # finding does not run pytriton/__init__.py
    if spec is None or not spec.submodule_search_locations:
        raise _install_hint("nvidia-pytriton (the Triton server binary)")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise _install_hint(f"{root}/bin/tritonserver")
    return root


def libs_dir() -> Path:
    return wheel_root().parents[1] / "nvidia_pytriton.libs"


def _stub(root: Path) -> Path:
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.is_file():
        have = ", ".join(sorted(p.name for p in (root / "python_backend_stubs").iterdir()))
        raise UsageError(f"{stub}: the Triton wheel has no python backend stub for Python {ver} (it has {have}); "
                         f"run retool with one of those Pythons")
    return stub


@dataclass(frozen=True)
class TritonHome:
    path: Path

    @property
    def server(self) -> Path:
        return self.path / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.path / "backends"

    @property
    def caches(self) -> Path:
        return self.path / "caches"


def _fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    h.update(BACKEND_SRC.read_bytes())
    h.update(sys.executable.encode())
    h.update(str((root / "bin" / "tritonserver").stat().st_size).encode())
    return h.hexdigest()[:12]


def ensure_home() -> TritonHome:
    """Build (once) and return the Triton home under retool's cache dir."""
    root = wheel_root()
    stub = _stub(root)
    home = cache_dir() / f"triton-2.51-py{sys.version_info[0]}{sys.version_info[1]}-{_fingerprint(root)}"
    if (home / ".complete").exists():
        return TritonHome(home)
    from filelock import FileLock

    home.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home) + ".lock"):
        if (home / ".complete").exists():
            return TritonHome(home)
        tmp = home.with_name(home.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        for part in ("bin", "caches", "backends/python"):
            shutil.copytree(root / part, tmp / part, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, tmp / "backends" / "python" / "triton_python_backend_stub")
        (tmp / "backends" / "onnxruntime").mkdir(parents=True)
        shutil.copy2(BACKEND_SRC, tmp / "backends" / "onnxruntime" / "model.py")
        (tmp / ".complete").write_text(f"from {root}\n")
        shutil.rmtree(home, ignore_errors=True)
        os.replace(tmp, home)
    return TritonHome(home)


def server_env(base: dict | None = None) -> dict:
    """The environment the server and its python stubs need (both traps measured, see stack-facts)."""
    env = dict(os.environ if base is None else base)
    # the stub embeds libpython: without the running interpreter's LIBDIR it loads the system's
    # libpython and fails with "'_thread.RLock' object has no attribute '_recursion_count'"
    libdirs = [sysconfig.get_config_var("LIBDIR") or "", str(libs_dir())]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([d for d in libdirs if d] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    # the stub runs the first python3 on PATH: it must be this venv's, so that onnxruntime imports
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONNOUSERSITE", "1")
    return env


def perf_analyzer() -> Path:
    """bin/perf_analyzer of the tritonclient wheel, beside this interpreter."""
    cand = Path(sys.executable).parent / "perf_analyzer"
    if not cand.is_file():
        found = shutil.which("perf_analyzer")
        if not found:
            raise _install_hint("perf_analyzer (from the tritonclient wheel)")
        cand = Path(found)
    return cand


def perf_env() -> dict:
    """perf_analyzer links libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12) and libb64.so.0d (Debian libb64-0d)."""
    env = dict(os.environ)
    dirs = []
    spec = importlib.util.find_spec("nvidia")
    for loc in (spec.submodule_search_locations if spec and spec.submodule_search_locations else []):
        lib = Path(loc) / "cuda_runtime" / "lib"
        if (lib / "libcudart.so.12").exists():
            dirs.append(str(lib))
    if not dirs:
        raise _install_hint("nvidia-cuda-runtime-cu12 (libcudart.so.12 for perf_analyzer)")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    return env
