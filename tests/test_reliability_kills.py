"""The parts of the kill -9 campaign (bench/kills.py) that need no server: finding what a SIGKILLed
process left running, its server folders, the counting and the page."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from bench import kills
from bench.reliability import NO_KILLS, splice
from fixtures.proctree import Watch, left, wait_gone


def _spawn(script: str, env=None) -> subprocess.Popen:
    return subprocess.Popen(["sh", "-c", script], env={**os.environ, **(env or {})}, start_new_session=True)


def _until(cond, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def reap():
    """Kill, by PID, whatever a test left (its sleeps), however it ends."""
    procs = []
    yield procs
    for p in procs:
        try:
            p.kill()
        except Exception:
            pass


def test_children_of_a_sigkilled_parent_are_found_and_a_finished_child_is_not(reap):
    # two sleeps outlive sh; a third ends before the kill and must not count (2 s: long enough for the
    # 50 ms sampler to see it on a loaded machine)
    p = _spawn("sleep 2; sleep 60 & sleep 60 & wait")
    with Watch(p.pid) as w:
        assert _until(lambda: sum(n == "sleep" for n in w.seen.values()) >= 3)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    reap.extend(w.seen)
    found = kills.survivors(w.seen, "no-such-token", None, time.monotonic() + 0.5)
    reap.extend(found)
    assert len(found) == 2 and {q.name() for q in found} == {"sleep"}
    assert {q.ppid() for q in found} != {p.pid}  # re-parented: only the samples knew they were its own
    for q in found:
        q.kill()
    assert wait_gone(found, 10) == []
    assert kills.survivors(w.seen, "no-such-token", None, time.monotonic()) == []


def test_a_child_that_execs_after_it_was_first_seen_bears_its_new_name(reap):
    # a child is first seen as a copy of its parent (between fork and exec); CI saw 'sh' for a sleep
    p = _spawn("sh -c 'sleep 0.5; exec sleep 60'; wait")
    with Watch(p.pid) as w:
        assert _until(lambda: "sh" in w.seen.values())
        assert _until(lambda: "sleep" in w.seen.values() and "sh" not in w.seen.values())
    reap.extend(w.seen)


def test_a_process_never_sampled_is_found_by_the_marker_in_its_environment(reap):
    token = "t" + os.urandom(6).hex()
    stray = _spawn("exec sleep 60", {kills.MARK: token})
    other = _spawn("exec sleep 60", {kills.MARK: token + "x"})  # another run's: not ours
    reap.extend(__import__("psutil").Process(q.pid) for q in (stray, other))
    assert _until(lambda: len(kills.survivors({}, token, None, time.monotonic())) == 1)
    found = kills.survivors({}, token, None, time.monotonic())
    assert [q.pid for q in found] == [stray.pid]
    for q in (stray, other):
        q.kill()
        q.wait()
    assert kills.survivors({}, token, None, time.monotonic()) == []


def test_a_process_naming_the_repository_is_found(tmp_path, reap):
    repo = tmp_path / "repo"
    repo.mkdir()
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(repo)])
    reap.append(__import__("psutil").Process(p.pid))
    assert _until(lambda: p.pid in [q.pid for q in kills.survivors({}, "none", repo, time.monotonic())])
    p.kill()
    p.wait()
    assert left([p.pid]) == []
    assert kills.survivors({}, "none", repo, time.monotonic()) == []


def test_only_the_killed_pids_server_folders_are_reported_and_removed(tmp_path):
    mine = tmp_path / "retool-triton-123-abcd"
    other = tmp_path / "retool-triton-1234-efgh"
    for d in (mine, other):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "tritonserver.log").write_text("x")
    assert kills.folders_left(123, time.monotonic(), tmp_path) == [mine.name]
    assert not mine.exists() and other.is_dir()
    assert kills.folders_left(99, time.monotonic(), tmp_path) == []


def _cmd():
    c = kills.Command("serve", typical_s=6.5, baseline="served, exit 0 on Ctrl-C")
    c.kills = [
        kills.Kill("serve", 0.4, seen=["python3"]),
        kills.Kill("serve", 3.2, seen=["python3", "tritonserver", "triton_python_b"],
                   orphans=["triton_python_b (pid 41)", "triton_python_b (pid 42)"]),
        kills.Kill("serve", 5.9, ended_first=True, code=8),
        kills.Kill("serve", 2.0, seen=["tritonserver"], verify="exit 7: lin: no config.pbtxt",
                   folders=["retool-triton-77-x"]),
    ]
    return c


def test_counts_per_command():
    n = kills.counts(_cmd())
    assert n == {"kills": 3, "ended before the kill": 1, "orphans": 2, "kills with orphans": 1,
                 "verify failures": 1, "folders left": 1, "delays": (0.4, 5.9)}
    assert kills.counts(kills.Command("publish"))["delays"] is None


def test_the_section_gives_counts_machine_and_every_problem():
    c = _cmd()
    machine = {"cpu_model": "AMD EPYC", "cpus_usable": 2, "loadavg": [3.1, 2.0, 1.5], "others_cpu_pct": 61.0,
               "steal_pct": 0.2, "busy": True, "git_commit": "abc1234"}
    text = kills.section([c, kills.Command("publish", baseline="exit 7: refused")], machine, "2026-12-02 16:50",
                         120, 20, 0)
    assert text.startswith("## kill -9\n")
    assert "| serve | 3 | 1 | 2 | 1 | 1 | 0.40 – 5.90 | 6.5 s, served, exit 0 on Ctrl-C |" in text
    assert "tritonserver 2, triton_python_backend_stub 1 |" in text
    assert "| publish | 0 | 0 | 0 | 0 | 0 | – | exit 7: refused | none |" in text
    assert "- serve killed at 3.20 s: orphans: triton_python_b (pid 41), triton_python_b (pid 42)" in text
    assert "- serve killed at 2.00 s: verify: exit 7: lin: no config.pbtxt; folders: retool-triton-77-x" in text
    assert "serve (delay 5.90 s) exit 8" in text
    assert "abc1234" in text and "load average 3.10" in text and "61 %" in text and "(busy)" in text
    clean = kills.section([kills.Command("serve", 1.0, "ok", [kills.Kill("serve", 0.5)])], machine, "d", 1, 1, 0)
    assert "Nothing: no orphan" in clean


def test_splice_keeps_the_part_not_rerun():
    old = "# Reliability\n\ncorpus table\n\n## kill -9\n\nold kills\n"
    assert splice(old, None, "## kill -9\n\nnew kills\n") == "# Reliability\n\ncorpus table\n\n## kill -9\n\nnew kills\n"
    assert splice(old, "# Reliability\n\nnew corpus\n", None) == \
        "# Reliability\n\nnew corpus\n\n## kill -9\n\nold kills\n"
    assert splice(None, "# R\n", None) == "# R\n\n" + NO_KILLS
    assert splice("# R\n\nno kill part\n", None, "## kill -9\n\nk\n") == "# R\n\nno kill part\n\n## kill -9\n\nk\n"


def test_first_line_of_an_error():
    assert kills._first_line("• loading\nlin: no config.pbtxt (fix: publish again)\n") == \
        "lin: no config.pbtxt (fix: publish again)"
    assert kills._first_line("Traceback (most recent call last):\n  File x\nKeyError: 'y'\n") == "KeyError: 'y'"
    assert kills._first_line("") == "(nothing)"


def test_where_a_publish_kill_landed_and_its_column(tmp_path):
    folder = tmp_path / "lin"
    assert kills.publish_landed(folder, set()) == "no trace"  # killed before the model folder existed
    (folder / "1").mkdir(parents=True)
    assert kills.publish_landed(folder, {"1"}) == "no trace"
    (folder / ".staging-host-9-abcd").mkdir()
    assert kills.publish_landed(folder, {"1"}) == "staging"
    (folder / "2").mkdir()
    assert kills.publish_landed(folder, {"1"}) == "new version"
    c = kills.Command("publish", 2.0, "exit 0", [kills.Kill("publish", 0.1, landed="no trace"),
                                                 kills.Kill("publish", 1.2, landed="new version"),
                                                 kills.Kill("publish", 0.2, landed="no trace"),
                                                 kills.Kill("publish", 1.9, ended_first=True, code=0)])
    assert kills._phases(c) == "no trace 2, new version 1"
