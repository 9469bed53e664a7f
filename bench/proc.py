"""Child processes with their own wall time and peak RSS.

``os.wait4`` returns the rusage of that one child (and the descendants it
waited for), so each measurement gets its own peak RSS; the process-wide
``RUSAGE_CHILDREN`` would only ever report the largest child so far.

Linux counts the pages a child had between fork and exec in its peak RSS, so a
child forked from a large process (a test run with torch loaded) would report
at least that process's size. Each child is therefore started by a small
launcher interpreter, and the launcher's wait4 measures it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "bench" / "child.py"


@dataclass(frozen=True)
class ChildResult:
    rc: int
    wall_s: float
    maxrss_bytes: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def tail(self, n: int = 600) -> str:
        text = (self.stderr or self.stdout).strip()
        return text[-n:]

    def last_json(self):
        """The last stdout line that parses as JSON (child tasks print their result there)."""
        for line in reversed(self.stdout.strip().splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except ValueError:
                    continue
        return None


PY = sys.executable
#: Exit code of retool's MissingDependency: the extra is not installed, so the figure is skipped, not failed.
EXIT_MISSING_DEPENDENCY = 3


def retool_cmd() -> list[str]:
    exe = Path(PY).parent / "retool"
    return [str(exe)] if exe.exists() else [PY, "-m", "retool"]


def child_failure(r: ChildResult, what: str) -> dict:
    """A failed child as a section's result: skipped when an extra is missing, else an error with its last line."""
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else r.stdout.strip()[-300:]
    status = "skipped" if r.rc == EXIT_MISSING_DEPENDENCY else "error"
    why = "timed out" if r.timed_out else f"exit {r.rc}"
    return {"status": status, "reason": f"{what}: {why}: {last[:400]}", "stderr_tail": r.tail(1500)}


def child_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow", "PYTHONUNBUFFERED": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra or {})
    return env


# Runs argv[2:], waits for it and writes its peak RSS (as wait4 reports it) and its wall time
# to argv[1], so the launcher's own start-up is in neither figure.
_LAUNCHER = (
    "import os, sys, time\n"
    "t0 = time.perf_counter()\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    try:\n"
    "        os.execvp(sys.argv[2], sys.argv[2:])\n"
    "    finally:\n"
    "        os._exit(127)\n"
    "_, status, ru = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(f'{ru.ru_maxrss} {time.perf_counter() - t0}')\n"
    "sys.exit(os.waitstatus_to_exitcode(status) % 256)\n"
)


def run_child(cmd: list[str], timeout: float = 900, env: dict | None = None, cwd=ROOT) -> ChildResult:
    """Run ``cmd``; wall time from spawn to exit, peak RSS from wait4 (Linux reports KiB)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, rss.name, *[str(c) for c in cmd]],
                             stdout=out, stderr=err, cwd=cwd, env=child_env(env), start_new_session=True)
        fired = threading.Event()

        def kill():
            fired.set()
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)  # blocking: exact exit time
        except BaseException:  # Ctrl-C: don't leave the child's process group running
            kill()
            os.wait4(p.pid, 0)
            raise
        finally:
            timer.cancel()
        timed_out = fired.is_set()
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        scale = 1 if sys.platform == "darwin" else 1024
        measured = rss.read().split()  # empty when the launcher was killed (timeout)
        maxrss = int(measured[0]) if measured else int(ru.ru_maxrss)
        wall = float(measured[1]) if measured else wall
        return ChildResult(p.returncode, wall, maxrss * scale, out.read().decode("utf-8", "replace"),
                           err.read().decode("utf-8", "replace"), timed_out)


def run_task(task: str, args: dict, timeout: float = 900, env: dict | None = None) -> tuple[ChildResult, dict | None]:
    """Run one ``bench/child.py`` task in a fresh interpreter; returns (process result, its JSON result)."""
    r = run_child([sys.executable, str(CHILD), task, json.dumps(args)], timeout=timeout, env=env)
    return r, r.last_json()


def convert(source: str, extra: list[str], dst: Path, timeout: float = 900, env: dict | None = None) -> tuple[ChildResult, dict | None]:
    """``retool convert SOURCE -o DST --json`` in a child: its result and the report it printed."""
    r = run_child(retool_cmd() + ["convert", source, "-o", str(dst), *extra, "--json"], timeout=timeout, env=env)
    try:
        report = json.loads(r.stdout) if r.ok else None
    except ValueError:
        report = None
    return r, report
