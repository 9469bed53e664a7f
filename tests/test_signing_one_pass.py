"""`repo verify --trust-key` reads each file's bytes once (issue 25's figure): the signature check takes the
sha256 that retool's verify pass just computed instead of hashing the files again, and still refuses a
changed file with the file's name."""
from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.onnx_tiny import linear
from retool.publish import open_repo, publish

pytest.importorskip("model_signing")
ec = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ec")
ser = pytest.importorskip("cryptography.hazmat.primitives.serialization")


@pytest.fixture
def signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = tmp_path / "key.pem", tmp_path / "key.pub.pem"
    priv.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    repo = tmp_path / "repo"
    publish(linear(tmp_path / "a.onnx", external_data_mb=0.2), repo, "m", sign_key=priv, max_regression="off")
    return repo, pub


def _check(folder: Path, pub: Path, known: dict | None):
    from retool.publish import signing

    signing._verifier(pub).set_hashing_config(signing._hashing(["model.sig"], known)).verify(folder, folder / "model.sig")


def test_the_signature_check_uses_the_digests_given_not_the_bytes(signed):
    from retool.fsutil import sha256_file

    repo, pub = signed
    v1 = repo / "m" / "1"
    data = {p.name: sha256_file(p) for p in v1.iterdir() if p.name not in ("model.sig", "manifest.json")}
    _check(v1, pub, data)  # the right digests: passes, manifest.json hashed by model-signing itself
    wrong = {**data, "a.onnx.data": "0" * 64}
    with pytest.raises(ValueError, match="Hash mismatch for 'a.onnx.data'"):
        _check(v1, pub, wrong)  # the file is intact: only the given digest can have failed it


def test_verify_repository_passes_a_signed_repository_and_names_a_changed_file(signed):
    from retool.publish.signing import verify_repository

    repo, pub = signed
    findings, checked = verify_repository(open_repo(repo), None, pub)
    assert findings == [] and checked == 5  # model, data, samples, manifest, model.sig
    data = repo / "m" / "1" / "a.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    findings, _ = verify_repository(open_repo(repo), "m", pub)
    kinds = {(f.problem, Path(f.path).name) for f in findings}
    assert ("changed", "a.onnx.data") in kinds  # the manifest check
    assert ("bad-signature", "a.onnx.data") in kinds  # the signature check, from the same pass's digest


def test_large_files_hash_in_a_child_process_with_the_same_digests_and_findings(signed, monkeypatch):
    """From CHILD_HASH_MIN_BYTES on, verify hashes in a child Python (so model-signing's import beside it does
    not stall the reads); the digests, and a changed file's findings, are the same as hashed here."""
    import subprocess

    from retool import fsutil
    from retool.publish.signing import verify_repository

    repo, pub = signed
    files = sorted(p for p in (repo / "m" / "1").iterdir())
    here = [fsutil.sha256_file(p) for p in files]
    children = []
    real_popen = subprocess.Popen

    def counting(cmd, *a, **k):
        children.append(cmd)
        return real_popen(cmd, *a, **k)

    monkeypatch.setattr(fsutil, "CHILD_HASH_MIN_BYTES", 1)
    monkeypatch.setattr(subprocess, "Popen", counting)
    assert fsutil.sha256_files(files) == here and len(children) == 1
    data = repo / "m" / "1" / "a.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    findings, _ = verify_repository(open_repo(repo), "m", pub)
    assert len(children) == 2  # verify's pass went through the child
    kinds = {(f.problem, Path(f.path).name) for f in findings}
    assert {("changed", "a.onnx.data"), ("bad-signature", "a.onnx.data")} <= kinds
    # a missing file raises as it does without the child
    with pytest.raises(FileNotFoundError):
        fsutil.sha256_files([files[0], repo / "absent"])


def test_hash_early_results_are_used_only_for_unchanged_files(signed, monkeypatch, cli):
    """``repo verify`` starts hashing a local repository's version files in a child before its imports; verify
    takes those digests, but never for a file changed since (size or mtime), and still names a tampered file."""
    import hashlib
    import os

    from retool import fsutil

    repo, pub = signed
    monkeypatch.setattr(fsutil, "CHILD_HASH_MIN_BYTES", 1)
    files = sorted(p for p in (repo / "m" / "1").iterdir())
    fsutil.hash_early(files)
    assert set(fsutil._EARLY) == {str(p) for p in files}
    data = repo / "m" / "1" / "a.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[1] ^= 1
    data.write_bytes(bytes(raw))
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a write inside one mtime tick shows too
    got = fsutil.sha256_files(files)
    assert got == [hashlib.sha256(p.read_bytes()).hexdigest() for p in files] and not fsutil._EARLY
    import subprocess

    children = []
    real_popen = subprocess.Popen

    def popen(cmd, *a, **k):
        children.append(fsutil.HASH_SCRIPT in cmd)
        return real_popen(cmd, *a, **k)

    monkeypatch.setattr(subprocess, "Popen", popen)
    r = cli("repo", "verify", repo, "--require-signature", "--trust-key", pub)
    assert r.code == 7 and "a.onnx.data" in r.err, r.err
    assert children.count(True) == 1  # every file verify hashed came from the early child: no second one
    assert not fsutil._EARLY  # and what nobody asked for (manifest.json, model.sig) is forgotten


def test_kill_9_of_repo_verify_leaves_no_hashing_child(signed, tmp_path):
    """The child that hashes a large repository dies with retool: a sparse 64 GiB version file (no disk
    used, seconds of hashing) keeps it busy while ``repo verify`` is killed with SIGKILL."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fixtures.proctree import descendants, wait_gone

    repo, _ = signed
    os.truncate(repo / "m" / "1" / "a.onnx.data", 64 << 30)
    p = subprocess.Popen([sys.executable, "-m", "retool", "repo", "verify", str(repo)], cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, kids = time.monotonic() + 60, {}
        while not kids and time.monotonic() < deadline and p.poll() is None:
            kids = {pid: n for pid, n in descendants(p.pid).items() if n.startswith("python")}
            time.sleep(0.05)
        assert kids, "repo verify started no hashing child"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        assert not wait_gone(list(kids), 20), kids
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
