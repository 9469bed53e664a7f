"""kill -9 campaign for docs/reliability.md (issue 21): SIGKILL `publish`, `repo check`, `serve` and
`loadtest` at random points and count what is left behind.

Each command first runs once unkilled (its typical run time; for serve the time until it serves).
Then, round by round, each command is started as ``python -m retool ...`` in its own session on its
own copy of a tiny repository and SIGKILLed (retool alone, not its group: the point is what its
children do) after a seeded random delay within that time. After the kill:

* orphans: every process seen under retool (sampled every 50 ms), every process whose environment
  carries this run's marker, and every process whose command line names this run's repository,
  still running 5 s after the kill; each is then SIGKILLed by PID;
* verify: ``retool repo verify REPO`` must exit 0;
* folders: ``/tmp/retool-triton-<killed pid>-*`` still there 10 s after the kill (then removed).

Run by ``python -m bench.reliability --kills N``; tests/test_reliability_kills.py covers the parts that
need no server.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fixtures.proctree import Watch, left, marked, using

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("publish", "repo check", "serve", "loadtest")
MARK = "RETOOL_KILLS_RUN"
GONE_S = 5.0
FOLDER_S = 10.0
#: test hooks that widen publish's windows (per staged file; between the version's rename and the config)
PUBLISH_ENV = {"RETOOL_TEST_STAGE_DELAY_S": "0.3", "RETOOL_TEST_COMMIT_DELAY_S": "0.5"}
SERVE_READY_TIMEOUT_S = 240
RUN_TIMEOUT_S = 600
#: runs per kill asked: one that ends on its own before its kill is retried with a new delay
RETRIES = 3


@dataclass
class Kill:
    command: str
    delay_s: float
    ended_first: bool = False  # the command exited on its own before the kill came
    code: int | None = None  # its exit code then
    seen: list[str] = field(default_factory=list)  # names of the processes seen under retool
    orphans: list[str] = field(default_factory=list)  # "name (pid N)" still running GONE_S after the kill
    verify: str | None = None  # None: repo verify exited 0; else its exit code and first line
    landed: str = ""  # publish: what the killed publish left in the model folder (before verify)
    folders: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        out = []
        if self.orphans:
            out.append("orphans: " + ", ".join(self.orphans))
        if self.verify:
            out.append("verify: " + self.verify)
        if self.folders:
            out.append("folders: " + ", ".join(self.folders))
        return out


@dataclass
class Command:
    name: str
    typical_s: float | None = None  # the unkilled run's time (serve: until it serves)
    baseline: str = ""  # how the unkilled run ended
    kills: list[Kill] = field(default_factory=list)


def counts(c: Command) -> dict:
    killed = [k for k in c.kills if not k.ended_first]
    delays = [k.delay_s for k in c.kills]
    return {
        "kills": len(killed),
        "ended before the kill": len(c.kills) - len(killed),
        "orphans": sum(len(k.orphans) for k in c.kills),
        "kills with orphans": sum(bool(k.orphans) for k in c.kills),
        "verify failures": sum(k.verify is not None for k in c.kills),
        "folders left": sum(len(k.folders) for k in c.kills),
        "delays": (min(delays), max(delays)) if delays else None,
    }


def publish_landed(folder: Path, before: set[str]) -> str:
    """Where a publish was killed, from what it left in its model folder: ``new version`` (a version
    folder appeared), ``staging`` (a .staging-* folder is there), else ``no trace``."""
    now = {e.name for e in folder.iterdir()} if folder.is_dir() else set()
    if any(e.isascii() and e.isdigit() for e in now - before):
        return "new version"
    if any(e.startswith(".staging-") for e in now):
        return "staging"
    return "no trace"


def _phases(c: Command) -> str:
    """How many kills came while each kind of child ran (publish: where they landed): the kills
    covered the phases that matter."""
    if c.name == "publish":
        landed = [k.landed for k in c.kills if not k.ended_first and k.landed]
        return ", ".join(f"{w} {landed.count(w)}" for w in ("no trace", "staging", "new version")
                         if w in landed) or "none"
    wanted = ("tritonserver", "triton_python_backend_stub", "perf_analyzer")
    names = {}
    for k in c.kills:
        if not k.ended_first:
            # a process read while exiting may give only its 15-character kernel name
            for n in {next((w for w in wanted if w.startswith(n) and len(n) >= 15), n) for n in k.seen}:
                names[n] = names.get(n, 0) + 1
    return ", ".join(f"{n} {names[n]}" for n in wanted if n in names) or "none"


def section(cmds: list[Command], machine: dict, started: str, seconds: float, per_command: int,
            seed: int) -> str:
    """The page's "## kill -9" section."""
    m = machine
    load = m.get("loadavg")
    lines = [
        "## kill -9",
        "",
        "Produced by `python -m bench.reliability --kills N` (`bench/kills.py`). Each command runs once",
        "unkilled (its typical time; serve: until it serves, plus 1 s), then N times as `python -m retool ...` in its",
        "own session on its own copy of a tiny published repository, SIGKILLed (retool alone, not its",
        "group) after a seeded random delay within that time (a run that ends on its own first is retried",
        f"with a new delay, {RETRIES} runs at most). publish gets a model with external data and",
        f"the test hooks {', '.join(f'`{k}={v}`' for k, v in PUBLISH_ENV.items())} to widen its windows;",
        "it publishes a second version of a model on odd kills and a first version of a new name on even",
        "ones. loadtest runs `--concurrency 1 --window-ms 300`.",
        "",
        "- orphans: a process seen under retool (sampled every 50 ms), or carrying the run's marker in its",
        f"  environment, or naming its repository on its command line, still running {GONE_S:.0f} s after the",
        "  kill (each is then SIGKILLed by PID);",
        "- verify failures: `retool repo verify REPO` did not exit 0 after the kill;",
        f"- folders left: `/tmp/retool-triton-<killed pid>-*` still there {FOLDER_S:.0f} s after the kill.",
        "",
        f"- date: {started} (UTC), {seconds:.0f} s; {per_command} kills per command asked, seed {seed}",
        f"- machine: {m.get('cpu_model')}, {m.get('cpus_usable')} usable cores"
        + (f", load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the end" if load else "")
        + (f", other processes used {m['others_cpu_pct']:.0f} % of the CPUs" if m.get("others_cpu_pct") is not None
           else "")
        + (f", steal {m['steal_pct']:.1f} %" if m.get("steal_pct") is not None else "")
        + (" (busy)" if m.get("busy") else ""),
        f"- retool commit: {m.get('git_commit')}",
        "",
        "| command | kills | ended before the kill | orphans | verify failures | folders left | delays (s) |"
        " unkilled run | kills that saw these children (publish: what it left) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cmds:
        n = counts(c)
        d = n["delays"]
        delays = f"{d[0]:.2f} – {d[1]:.2f}" if d else "–"
        typical = f"{c.typical_s:.1f} s, {c.baseline}" if c.typical_s is not None else c.baseline
        lines.append(f"| {c.name} | {n['kills']} | {n['ended before the kill']} | {n['orphans']} |"
                     f" {n['verify failures']} | {n['folders left']} | {delays} | {typical} | {_phases(c)} |")
    failed = [(c.name, k) for c in cmds for k in c.kills if k.ended_first and k.code != 0]
    if failed:
        lines += ["", "Runs that ended on their own, with a failure, before their kill: "
                  + "; ".join(f"{name} (delay {k.delay_s:.2f} s) exit {k.code}" for name, k in failed) + "."]
    bad = [(c.name, k) for c in cmds for k in c.kills if k.problems]
    lines += ["", "### What was left", ""]
    if bad:
        lines += [f"- {name} killed at {k.delay_s:.2f} s: {'; '.join(k.problems)}" for name, k in bad]
    else:
        lines.append("Nothing: no orphan, no verify failure, no folder left.")
    lines.append("")
    return "\n".join(lines)


# ---- running ------------------------------------------------------------------------------------------
class Campaign:
    def __init__(self, work: Path, seed: int = 0, log=None):
        self.work = work
        self.rng = random.Random(seed)
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self._n = 0

    def prepare(self) -> None:
        """The tiny published repository every run copies, and the model publish publishes."""
        from fixtures.onnx_tiny import linear
        from retool.publish import publish

        src = self.work / "src"
        src.mkdir(parents=True)
        publish(linear(src / "lin.onnx", external_data_mb=2), self.work / "base", "lin", max_regression="off")
        self.model = linear(src / "next.onnx", seed=1, external_data_mb=2)

    def argv(self, command: str, run: Path, repo: Path, i: int = 0) -> list[str]:
        if command == "publish":  # a second version of lin, or the first of a new name
            name = "lin" if i % 2 else "fresh"
            return ["-q", "publish", str(self.model), "--repo", str(repo), "--name", name, "--max-regression", "off"]
        if command == "repo check":
            return ["repo", "check", str(repo), "lin"]
        if command == "serve":
            return ["serve", str(repo)]
        if command == "loadtest":
            return ["loadtest", str(repo), "lin", "--concurrency", "1", "--window-ms", "300", "--out", str(run / "lt")]
        raise ValueError(command)

    def _start(self, command: str, stdout=subprocess.DEVNULL, i: int = 0):
        self._n += 1
        run = self.work / f"{command.replace(' ', '-')}-{self._n}"
        repo = run / "repo"
        shutil.copytree(self.work / "base", repo)
        token = uuid.uuid4().hex
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", MARK: token,
               **(PUBLISH_ENV if command == "publish" else {})}
        err = open(run / "stderr.txt", "wb")
        p = subprocess.Popen([sys.executable, "-m", "retool", *self.argv(command, run, repo, i)], cwd=run, env=env,
                             stdin=subprocess.DEVNULL, stdout=stdout, stderr=err, start_new_session=True)
        err.close()
        return p, run, repo, token

    def baseline(self, c: Command) -> None:
        """One unkilled run: the time the kills spread over."""
        serve = c.name == "serve"
        p, run, repo, token = self._start(c.name, subprocess.PIPE if serve else subprocess.DEVNULL)
        t0 = time.monotonic()
        try:
            if serve:
                ready = _wait_served(p, SERVE_READY_TIMEOUT_S)
                if ready:
                    c.typical_s = time.monotonic() - t0 + 1.0  # and a second of serving
                    p.send_signal(signal.SIGINT)
                    code = p.wait(120)
                    c.baseline = f"served, exit {code} on Ctrl-C"
                else:
                    code = p.poll()
                    c.baseline = f"never served (exit {code})"
            else:
                code = p.wait(RUN_TIMEOUT_S)
                c.typical_s = time.monotonic() - t0
                c.baseline = f"exit {code}"
                if code != 0:
                    c.typical_s = None
        except subprocess.TimeoutExpired:
            c.baseline = "timed out"
        finally:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
            if p.stdout:
                p.stdout.close()
        if c.typical_s is None:
            c.baseline += ": " + _first_line((run / "stderr.txt").read_text(errors="replace"))
        orphans, folders = self._cleanup_after(p.pid, repo, token, {})
        if orphans or folders:  # after a run that was not killed: worth a line on the page
            c.baseline += f"; left {', '.join(orphans + folders)}"
        shutil.rmtree(run, ignore_errors=True)
        self.log(f"{c.name}: unkilled run {c.baseline}"
                 + (f", {c.typical_s:.1f} s" if c.typical_s is not None else ""))

    def kill_once(self, c: Command) -> Kill:
        delay = round(self.rng.uniform(0.05, c.typical_s), 2)
        k = Kill(c.name, delay)
        i = len(c.kills) + 1
        p, run, repo, token = self._start(c.name, i=i)
        folder = repo / self.argv(c.name, run, repo, i)[6] if c.name == "publish" else None
        before = {e.name for e in folder.iterdir()} if folder is not None and folder.is_dir() else set()
        try:
            with Watch(p.pid) as w:
                try:
                    k.code = p.wait(delay)
                    k.ended_first = True
                except subprocess.TimeoutExpired:
                    w.sample()
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait()
        except BaseException:  # interrupted: leave nothing of this run behind
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
            self._cleanup_after(p.pid, repo, token, w.seen, time.monotonic() - GONE_S)
            raise
        killed_at = time.monotonic()
        k.seen = sorted(set(w.seen.values()))
        if folder is not None:
            k.landed = publish_landed(folder, before)
        k.orphans, k.folders = self._cleanup_after(p.pid, repo, token, w.seen, killed_at)
        k.verify = verify(repo)
        shutil.rmtree(run, ignore_errors=True)
        self.log(f"{c.name} #{len(c.kills) + 1} at {delay:.2f} s"
                 + (f" (ended first, exit {k.code})" if k.ended_first else "")
                 + f", saw {', '.join(k.seen) or 'no child'}" + (f", left {k.landed}" if k.landed else "")
                 + f": {'; '.join(k.problems) or 'ok'}")
        return k

    def _cleanup_after(self, pid: int, repo: Path, token: str, seen: dict, since: float | None = None):
        """What is left of a dead retool: orphans (then killed by PID) and its server folders (then removed)."""
        since = time.monotonic() if since is None else since
        orphans = survivors(seen, token, repo, since + GONE_S)
        names = []
        for p in orphans:
            try:
                names.append(f"{p.name()} (pid {p.pid})")
                p.kill()
            except Exception:  # gone meanwhile: it was still an orphan at the deadline
                names.append(f"pid {p.pid}")
        return names, folders_left(pid, since + FOLDER_S)


def survivors(seen, token: str, repo: Path | None, deadline: float) -> list:
    """The processes of a dead retool still running at ``deadline``: seen under it, marked with its
    token, or naming its repository."""
    import psutil

    while True:
        found = {p: None for p in left(seen)}
        for p in marked(MARK, token):
            found.setdefault(p, None)
        if repo is not None:
            for pid in using(repo):
                try:
                    found.setdefault(psutil.Process(pid), None)
                except psutil.Error:
                    pass
        alive = [p for p in left(found) if p.pid != os.getpid()]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def folders_left(pid: int, deadline: float, tmp: str | None = None) -> list[str]:
    """``retool-triton-<pid>-*`` folders still there at ``deadline``; removed, and their names returned."""
    tmp = Path(tmp or tempfile.gettempdir())
    while True:
        found = sorted(tmp.glob(f"retool-triton-{pid}-*"))
        if not found or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    for d in found:
        shutil.rmtree(d, ignore_errors=True)
    return [d.name for d in found]


def verify(repo: Path) -> str | None:
    r = subprocess.run([sys.executable, "-m", "retool", "repo", "verify", str(repo)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return None if r.returncode == 0 else f"exit {r.returncode}: {_first_line(r.stderr or r.stdout)}"


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("•")]
    return (lines[-1] if any("Traceback" in ln for ln in lines) else lines[0])[:200] if lines else "(nothing)"


def _wait_served(p: subprocess.Popen, timeout: float) -> bool:
    """True once ``retool serve`` printed its log line (it serves), False if it exited or timed out."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    fd = p.stdout.fileno()
    while time.monotonic() < deadline:
        if not sel.select(timeout=0.5):
            if p.poll() is not None:
                return False
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return False
        buf += chunk
        if any(line.split()[:1] == [b"log"] for line in buf.splitlines()):
            return True
    return False


def campaign(per_command: int, commands=COMMANDS, seed: int = 0, budget_s: float | None = None,
             log=None) -> list[Command]:
    """Unkilled runs, then ``per_command`` rounds of one kill per command (a round starts only within
    ``budget_s``, so that a cut-short campaign still has about as many kills of each)."""
    cmds = [Command(n) for n in commands]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="retool-kills-") as work:
        camp = Campaign(Path(work), seed, log)
        camp.prepare()
        for c in cmds:
            camp.baseline(c)
        try:
            for i in range(per_command):
                if budget_s is not None and time.monotonic() - t0 > budget_s:
                    camp.log(f"budget of {budget_s:.0f} s spent after {i} rounds")
                    break
                for c in cmds:
                    for _ in range(RETRIES):  # a run that ended before its kill is retried
                        if c.typical_s is None:
                            break
                        c.kills.append(camp.kill_once(c))
                        if not c.kills[-1].ended_first:
                            break
        except KeyboardInterrupt:  # Ctrl-C: the page still gets the kills done so far
            camp.log("interrupted: counting the kills done")
    return cmds
