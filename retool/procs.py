"""Processes and folders retool starts, and what is left of them after a kill -9: a child process gets
SIGKILL when retool dies (``die_with_parent``), and a temporary folder carries its owner's pid so a later
retool removes it once that owner is gone (``temp_dir``, ``clean_dead_temp``)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path


def die_with_parent() -> "callable | None":
    """A preexec_fn that makes the child get SIGKILL when retool dies (Linux PR_SET_PDEATHSIG).

    The signal follows the *thread* that forked: only armed from the main thread, which lives as
    long as retool does. None where prctl is not available."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # retool died between fork and prctl
            os._exit(1)

    return arm


_TEMP = re.compile(r"retool-([a-z0-9]+)-(\d+)-[a-z0-9_]+")


def temp_prefix(kind: str) -> str:
    """``retool-KIND-PID-``: the name of every temporary folder retool makes, which ``clean_dead_temp`` reads."""
    return f"retool-{kind}-{os.getpid()}-"


def temp_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A temporary folder named by ``temp_prefix``: when retool is killed before removing it, a later
    retool's ``clean_dead_temp`` sees that its owner is gone and removes it."""
    return tempfile.TemporaryDirectory(prefix=temp_prefix(kind))


def clean_dead_temp() -> list[Path]:
    """Remove the ``temp_dir`` folders whose retool is no longer running (killed with SIGKILL)."""
    gone = []
    for d in Path(tempfile.gettempdir()).glob("retool-*-*-*"):
        m = _TEMP.fullmatch(d.name)
        if m and d.is_dir() and not d.is_symlink() and not pid_alive(int(m.group(2))):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True
