"""Repository integrity: outputs that are devices, bounds on publish, kill -9 during publish, read-only and
full repositories, and the tampering that verify must catch (issue 21 items 2, 5 and 7)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.onnx_tiny import linear
from retool.errors import UsageError
from retool.publish import open_repo, publish

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(tmp_path) -> Path:
    (tmp_path / "src").mkdir()
    return linear(tmp_path / "src" / "tiny.onnx")


def one_clean_line(r, code):
    assert r.code == code, (r.code, r.err)
    assert "Traceback" not in r.err
    lines = [line for line in r.err.splitlines() if line.strip() and not line.startswith("•")]  # progress
    assert len(lines) == 1, r.err
    return lines[0]


def problems(repo, name=None):
    findings, _ = open_repo(repo).verify(name)
    return sorted((f.problem, f.version) for f in findings)


# ---- -o onto a device, FIFO or socket (item 2) ---------------------------------------------------------
def test_output_onto_a_fifo_or_a_device_is_refused_and_left_alone(tmp_path, tiny, cli):
    from retool.fsutil import check_output_path, move_onnx

    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    for target in (fifo, Path("/dev/null")):
        with pytest.raises(UsageError, match="not a regular file"):
            check_output_path(target)
        src = tmp_path / "work" / "m.onnx"
        src.parent.mkdir(exist_ok=True)
        shutil.copyfile(tiny, src)
        with pytest.raises(UsageError, match="never replaces it"):
            move_onnx(src, target)
        assert src.is_file()  # nothing was moved
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    # the CLI: one line, exit 2, and /dev/null is still the character device
    r = cli("optimize", tiny, "-o", "/dev/null", "--target", "cpu")
    assert "/dev/null" in one_clean_line(r, 2)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    r = cli("optimize", tiny, "-o", fifo, "--target", "cpu")
    assert "FIFO" in one_clean_line(r, 2)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


# ---- bounds (item 5) --------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--version", "99999999999999999999999"], "64-bit"),
    (["--version", "9223372036854775808"], "64-bit"),
    (["--version", "²"], "positive integer"),
    (["--max-batch-size", str(10**12)], "2147483647"),
    (["--max-batch-size", "-1"], "2147483647"),
    (["--instances", str(10**9)], "1024"),
    (["--instances", "0"], "1024"),
])
def test_publish_bounds_are_usage_errors_with_the_limit(tmp_path, tiny, cli, args, words):
    repo = tmp_path / "repo"
    r = cli("publish", tiny, "--repo", repo, "--name", "m", *args)
    assert words in one_clean_line(r, 2)
    assert not (repo / "m").exists() or not any(p.name[0].isdigit() for p in (repo / "m").iterdir())


def test_largest_int64_version_is_accepted(tmp_path, tiny):
    from retool.publish.names import MAX_VERSION, check_version

    assert check_version(str(MAX_VERSION)) == MAX_VERSION
    res = publish(tiny, tmp_path / "repo", "m", version=MAX_VERSION)
    assert res.version == MAX_VERSION and problems(tmp_path / "repo") == []


def test_a_profile_with_a_billion_instances_is_refused(tmp_path, tiny, cli):
    from retool.serve.profile import ServingConfig, ServingProfile

    prof = ServingProfile("m", ServingConfig(instance_count=10**9)).save(tmp_path / "serving.json")
    r = cli("publish", tiny, "--repo", tmp_path / "repo", "--name", "m", "--serving-profile", prof)
    line = one_clean_line(r, 2)
    assert "instance_count" in line and "1024" in line and str(prof) in line


# ---- kill -9 between the version's rename and the config (item 5) -----------------------------------------
def _publish_and_kill(model, repo, name, extra=()):
    # a killed publish cannot remove its temporary folder: let it leave it in the test's, not in /tmp
    env = {**os.environ, "RETOOL_TEST_COMMIT_DELAY_S": "60", "TMPDIR": str(repo.parent)}
    p = subprocess.Popen([sys.executable, "-m", "retool", "-q", "publish", str(model), "--repo", str(repo),
                          "--name", name, *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if any((repo / name).glob("*/manifest.json")) and len(list((repo / name).glob("*/manifest.json"))) > \
                    len(_before.get(name, ())):
                break
            if p.poll() is not None:
                raise AssertionError(p.stderr.read().decode())
            time.sleep(0.1)
        else:
            raise AssertionError("the version never appeared")
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


_before: dict = {}


def test_kill_9_after_the_rename_leaves_a_verifiable_repository(tmp_path, tiny):
    repo = tmp_path / "repo"
    _before.clear()
    _publish_and_kill(tiny, repo, "m")  # the first publish of m: no config before it
    assert (repo / "m" / "1" / "manifest.json").is_file()
    assert (repo / "m" / "config.pbtxt").is_file()  # written before the version became visible
    assert problems(repo) == []
    # a later publish is killed at the same point: still verifiable
    _before["m"] = [1]
    other = linear(tmp_path / "src" / "other.onnx", seed=5)
    _publish_and_kill(other, repo, "m")
    assert problems(repo) == []
    # the next writer finishes what was left pending, and records both versions in the index
    open_repo(repo).promote("m", 2, "production")
    idx = json.loads((repo / "m" / "history.json").read_text())
    assert "pending" not in idx and sorted(idx["versions"]) == ["1", "2"]
    assert [(e["event"], e.get("version")) for e in idx["history"]] == [("publish", 1), ("publish", 2),
                                                                          ("promote", 2)]
    assert all(e.get("completed") for e in idx["history"][:2])  # finished by the next writer
    assert problems(repo) == []


def test_temporaries_of_atomic_writes_are_cleaned(tmp_path, tiny):
    repo = tmp_path / "repo"
    publish(tiny, repo, "m")
    left = [repo / "m" / ".config.pbtxt.abc123.tmp", repo / "m" / ".aliases.json.def456.tmp",
            repo / "m" / ".history.json.x.tmp"]
    for p in left:
        p.write_text("half")
    publish(linear(tmp_path / "src" / "b.onnx", seed=3), repo, "m")
    assert not any(p.exists() for p in left)
    assert problems(repo) == []


# ---- read-only and full repositories, a symlinked lock (item 7) -------------------------------------------
def _in_namespace(script: str):
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs mount namespaces (unshare -m) to make a read-only or full file system")
    return subprocess.run(["unshare", "-m", "sh", "-ec", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_publish_into_a_read_only_repository_is_one_line(tmp_path, tiny):
    repo = tmp_path / "repo"
    publish(tiny, repo, "m")
    other = linear(tmp_path / "src" / "b.onnx", seed=3)
    py = sys.executable
    r = _in_namespace(f"mount --bind {repo} {repo}; mount -o remount,ro,bind {repo}; "
                      f"{py} -m retool -q publish {other} --repo {repo} --name m || echo rc=$?; "
                      f"{py} -m retool -q publish {other} --repo {repo} --name fresh || echo rc=$?; "
                      f"{py} -m retool -q repo promote {repo} m 1 || echo rc=$?")
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout.count("rc=7") == 3, (r.stdout, r.stderr)
    assert r.stderr.count("Read-only file system") == 3, r.stderr
    assert problems(repo) == []


def test_publish_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    big = linear(tmp_path / "big.onnx", seed=1, external_data_mb=2)
    repo = tmp_path / "repo"
    repo.mkdir()
    py = sys.executable
    r = _in_namespace(f"mount -t tmpfs -o size=1m tmpfs {repo}; "
                      f"{py} -m retool -q publish {big} --repo {repo} --name m || echo rc=$?; "
                      f"ls -A {repo}/m; {py} -m retool -q repo verify {repo} && echo verified")
    assert "Traceback" not in r.stderr, r.stderr
    assert "rc=7" in r.stdout and "No space left on device" in r.stderr, (r.stdout, r.stderr)
    assert ".staging" not in r.stdout  # the staged copy was removed


def test_a_symlinked_lock_file_is_one_line(tmp_path, tiny, cli):
    repo = tmp_path / "repo"
    publish(tiny, repo, "m")
    lock = repo / "m" / ".retool.lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(".retool.lock")  # a loop: ELOOP
    r = cli("repo", "promote", repo, "m", "1")
    assert "lock" in one_clean_line(r, 7)
    r = cli("publish", linear(tmp_path / "src" / "b.onnx", seed=3), "--repo", repo, "--name", "m")
    assert "lock" in one_clean_line(r, 7)


# ---- tampering verify must catch (item 5) -----------------------------------------------------------------
@pytest.fixture
def published(tmp_path, tiny):
    repo = tmp_path / "repo"
    publish(tiny, repo, "m")
    publish(linear(tmp_path / "src" / "b.onnx", seed=3), repo, "m")
    open_repo(repo).promote("m", 2, "production")
    assert problems(repo) == []
    return repo


@pytest.mark.parametrize("old, new", [
    ("dims: [ 4 ]", "dims: [ 5 ]"),
    ("max_batch_size: 8", "max_batch_size: 4"),
    ("versions: [ 2 ]", "versions: [ 1 ]"),
])
def test_config_edits_that_still_parse_are_caught(published, old, new):
    cfg = published / "m" / "config.pbtxt"
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new))
    assert problems(published) == [("changed", None)]
    findings, _ = open_repo(published).verify()
    field = {"dims": "input", "max_batch_size": "max_batch_size", "versions": "version_policy"}[old.split(":")[0]]
    assert field in findings[0].detail


def test_an_alias_moved_to_another_existing_version_is_caught(published):
    f = published / "m" / "aliases.json"
    data = json.loads(f.read_text())
    data["aliases"]["production"]["version"] = 1
    f.write_text(json.dumps(data))
    assert ("bad-alias", None) in problems(published)


def test_copied_version_folders_are_caught(published):
    for odd in ("01", "1.bak", " +2", "99999999999999999999"):  # Triton's stoll reads each as a version
        shutil.copytree(published / "m" / "1", published / "m" / odd)
        assert problems(published) == [("bad-version-folder", None)], odd
        shutil.rmtree(published / "m" / odd)
    shutil.copytree(published / "m" / "1", published / "m" / "3")  # canonical, with its manifest
    assert problems(published) == [("added", 3)]


def test_a_symlinked_version_folder_is_caught(published):
    (published / "m" / "3").symlink_to("1")
    assert problems(published) == [("symlinked", None)]
    assert open_repo(published).versions("m") == [1, 2]


def test_an_edited_manifest_is_caught(published):
    f = published / "m" / "1" / "manifest.json"
    f.write_text(f.read_text().replace('"forced": false', '"forced": true'))
    assert problems(published) == [("changed", 1)]


def test_a_deleted_index_is_reported_and_the_next_writer_records_one(published):
    (published / "m" / "history.json").unlink()
    assert problems(published) == [("missing", None)]
    open_repo(published).promote("m", 1, "staging")
    assert problems(published) == []
    assert json.loads((published / "m" / "history.json").read_text())["history"][0]["event"] == "adopted"


def test_non_ascii_digit_folders_do_not_crash_anything(published, tiny, cli):
    (published / "m" / "²").mkdir()
    (published / "m" / "٣").mkdir()
    (published / "odd").mkdir()
    (published / "odd" / "²").mkdir()
    assert cli("repo", "list", published).code == 0
    assert cli("repo", "verify", published).code == 0
    r = cli("publish", tiny, "--repo", published, "--name", "m", "--republish")
    assert r.code == 0, r.err
    assert open_repo(published).versions("m") == [1, 2, 3]
    assert problems(published) == []


def test_damaged_aliases_and_manifests_are_findings_not_crashes(published, cli):
    (published / "m" / "aliases.json").write_text("{not json")
    assert ("bad-alias", None) in problems(published)
    (published / "m" / "2" / "manifest.json").write_text("{not json")
    r = cli("repo", "verify", published)
    assert r.code == 7 and "Traceback" not in r.err


@pytest.mark.slow
def test_kill_9_at_random_points_of_publish_leaves_verify_clean(tmp_path, tiny):
    import random

    repo = tmp_path / "repo"
    rng = random.Random(7)
    env = {**os.environ, "RETOOL_TEST_STAGE_DELAY_S": "0.2", "RETOOL_TEST_COMMIT_DELAY_S": "0.3",
           "TMPDIR": str(tmp_path)}  # what a killed publish leaves stays in the test's folder
    for i in range(8):
        model = linear(tmp_path / "src" / f"k{i}.onnx", seed=10 + i, external_data_mb=0.1)
        p = subprocess.Popen([sys.executable, "-m", "retool", "-q", "publish", str(model), "--repo", str(repo),
                              "--name", "m", "--alias", "staging"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rng.uniform(0.8, 3.0))  # past the imports: staging, the rename, the config, the index
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        if (repo / "m").exists():
            assert problems(repo) == [], i
    publish(tiny, repo, "m", alias="staging")  # the next writer finishes whatever was left
    assert problems(repo) == []
    idx = json.loads((repo / "m" / "history.json").read_text())
    assert "pending" not in idx and sorted(map(int, idx["versions"])) == open_repo(repo).versions("m")
    assert not [p for p in (repo / "m").iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
