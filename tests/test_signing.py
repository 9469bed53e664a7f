"""Signed model repositories (OpenSSF model-signing): sign at publish, verify before anything is served."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.onnx_tiny import linear
from retool.publish import open_repo, publish

ms = pytest.importorskip("model_signing")
ec = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ec")
ser = pytest.importorskip("cryptography.hazmat.primitives.serialization")


def _keypair(folder: Path, stem: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = folder / f"{stem}.pem", folder / f"{stem}.pub.pem"
    priv.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture
def keys(tmp_path):
    (tmp_path / "keys").mkdir()
    return {"ours": _keypair(tmp_path / "keys", "ours"), "theirs": _keypair(tmp_path / "keys", "theirs")}


@pytest.fixture
def signed(tmp_path, keys):
    """A local repository: m v1 (external data) and v2, v2 promoted to production, all signed."""
    repo = tmp_path / "repo"
    key = keys["ours"][0]
    publish(linear(tmp_path / "a.onnx", external_data_mb=0.2), repo, "m", sign_key=key, max_regression="off")
    publish(linear(tmp_path / "b.onnx", seed=2, external_data_mb=0.2), repo, "m", sign_key=key,
            max_regression="off")
    open_repo(repo, signer=_signer(key)).promote("m", 2, "production")
    return repo


def _signer(key):
    from retool.publish.signing import signer

    return signer(key)


def _verify(cli, repo, pub):
    return cli("repo", "verify", repo, "--require-signature", "--trust-key", pub)


def _signed_files(sig: Path) -> set[str]:
    """The resources model-signing's payload lists (read from the bundle, as a check of our own)."""
    bundle = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    return {r["name"] for r in statement["predicate"]["resources"]}


def test_publish_signs_what_the_manifest_lists_and_verify_passes(signed, keys, cli):
    v1 = signed / "m" / "1"
    manifest = json.loads((v1 / "manifest.json").read_text())
    assert _signed_files(v1 / "model.sig") == set(manifest["files"]) | {"manifest.json"}
    assert {"model.onnx", "a.onnx.data", "samples.npz"} <= set(manifest["files"])
    assert _signed_files(signed / "m" / "config.sig") == {"config.pbtxt", "aliases.json", "history.json"}
    r = _verify(cli, signed, keys["ours"][1])
    assert r.code == 0, r.err
    assert "OK" in r.out
    assert cli("repo", "verify", signed).code == 0  # model.sig is not an unlisted file to plain verify


def test_model_signing_own_verifier_accepts_each_folder(signed, keys):
    pub = keys["ours"][1]
    for folder, sig in ((signed / "m" / "1", "model.sig"), (signed / "m", "config.sig")):
        ms.verifying.Config().use_elliptic_key_verifier(public_key=pub).verify(folder, folder / sig)
        with pytest.raises(ValueError):
            ms.verifying.Config().use_elliptic_key_verifier(public_key=keys["theirs"][1]).verify(folder, folder / sig)


def test_model_signing_cli_verifies_a_version(signed, keys):
    """The command docs/publish.md gives a serving platform."""
    ok = subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(signed / "m" / "2"), "--signature",
                         str(signed / "m" / "2" / "model.sig"), "--public_key", str(keys["ours"][1])],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    (signed / "m" / "2" / "model.onnx").write_bytes(b"not the model")
    bad = subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(signed / "m" / "2"), "--signature",
                          str(signed / "m" / "2" / "model.sig"), "--public_key", str(keys["ours"][1])],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "model.onnx" in bad.stderr


def _rewrite_manifest(repo):
    p = repo / "m" / "1" / "manifest.json"
    m = json.loads(p.read_text())
    m["published"]["user"] = "mallory"
    p.write_text(json.dumps(m, indent=2) + "\n")


def _edit_config(repo):
    p = repo / "m" / "config.pbtxt"
    p.write_text(p.read_text().replace("max_batch_size: 8", "max_batch_size: 4"))


def _move_alias(repo):
    p = repo / "m" / "aliases.json"
    a = json.loads(p.read_text())
    a["aliases"]["production"]["version"] = 1
    p.write_text(json.dumps(a))


def _flip_byte(p: Path):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


TAMPER = {
    "model bytes": (lambda r: _flip_byte(r / "m" / "1" / "model.onnx"), "model.onnx"),
    "external data": (lambda r: _flip_byte(r / "m" / "1" / "a.onnx.data"), "a.onnx.data"),
    "samples": (lambda r: _flip_byte(r / "m" / "2" / "samples.npz"), "samples.npz"),
    "config.pbtxt": (_edit_config, "config.pbtxt"),
    "manifest": (_rewrite_manifest, "manifest.json"),
    "alias": (_move_alias, "aliases.json"),
    "extra file": (lambda r: (r / "m" / "1" / "extra.bin").write_bytes(b"x"), "extra.bin"),
    "removed signature": (lambda r: (r / "m" / "2" / "model.sig").unlink(), "model.sig"),
    "removed config signature": (lambda r: (r / "m" / "config.sig").unlink(), "config.sig"),
}


@pytest.mark.parametrize("kind", list(TAMPER))
def test_each_kind_of_tampering_exits_7_naming_the_file(signed, keys, cli, kind):
    change, fname = TAMPER[kind]
    change(signed)
    r = _verify(cli, signed, keys["ours"][1])
    assert r.code == 7, (kind, r.out, r.err)
    assert fname in r.out, r.out  # the table: every finding, each naming its file
    assert str(signed / "m") in r.err.splitlines()[-1], r.err


def test_re_signed_with_another_key_is_refused(signed, keys, cli):
    """Someone who can write the repository changes the model and signs it with their own key."""
    v1 = signed / "m" / "1"
    _flip_byte(v1 / "model.onnx")
    manifest = json.loads((v1 / "manifest.json").read_text())
    from retool.fsutil import sha256_file

    manifest["files"]["model.onnx"]["sha256"] = sha256_file(v1 / "model.onnx")
    (v1 / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    _signer(keys["theirs"][0]).sign(v1, v1 / "model.sig", ["model.sig"])
    r = _verify(cli, signed, keys["ours"][1])
    assert r.code == 7, r.err
    assert "model.sig" in r.out and "not signed by the trusted key" in r.out, r.out


def test_a_copied_version_with_its_signature_is_refused(signed, keys, cli):
    shutil.copytree(signed / "m" / "1", signed / "m" / "3")
    r = _verify(cli, signed, keys["ours"][1])
    assert r.code == 7, r.out
    assert "/m/3" in r.err.splitlines()[-1]


def test_unsigned_repository_and_wrong_trust_key(tmp_path, signed, keys, cli):
    plain = tmp_path / "plain"
    publish(linear(tmp_path / "c.onnx"), plain, "m")
    r = _verify(cli, plain, keys["ours"][1])
    assert r.code == 7 and "model.sig" in r.err and "unsigned" in r.err
    r = _verify(cli, signed, keys["theirs"][1])
    assert r.code == 7 and ".sig" in r.err.splitlines()[-1]
    r = cli("repo", "verify", signed, "--require-signature")
    assert r.code == 2 and "--trust-key" in r.err


def test_signed_model_takes_only_signed_writes_and_stays_valid(signed, keys, cli, tmp_path):
    r = cli("repo", "promote", signed, "m", "1")
    assert r.code == 7 and "--sign-key" in r.err  # would leave config.sig stale
    assert _verify(cli, signed, keys["ours"][1]).code == 0
    assert cli("repo", "promote", signed, "m", "1", "--sign-key", keys["ours"][0]).code == 0
    r = cli("repo", "rollback", signed, "m", "--sign-key", keys["ours"][0])
    assert r.code == 0, r.err
    assert json.loads((signed / "m" / "aliases.json").read_text())["aliases"]["production"]["version"] == 2
    from retool.serve.profile import ServingConfig, ServingProfile

    prof = ServingProfile("m", ServingConfig(instance_count=2), {"throughput": 1.0, "p99_ms": 1.0}).save(
        tmp_path / "profile.json")
    assert cli("repo", "configure", signed, "m", "--profile", prof).code == 7
    r = cli("repo", "configure", signed, "m", "--profile", prof, "--sign-key", keys["ours"][0])
    assert r.code == 0, r.err  # a config revision, signed with the rest of the model's state
    assert "serving.json" in _signed_files(signed / "m" / "config.sig")
    r = _verify(cli, signed, keys["ours"][1])
    assert r.code == 0, r.out
    p = signed / "m" / "serving.json"
    p.write_text(p.read_text().replace('"instance_count": 2', '"instance_count": 3'))
    r = _verify(cli, signed, keys["ours"][1])
    assert r.code == 7 and "m/serving.json  changed since it was signed" in r.out, r.out


def test_repo_list_shows_the_signing_key(signed, keys, cli, tmp_path):
    from retool.publish.signing import fingerprint

    fp = fingerprint(keys["ours"][1])
    r = cli("repo", "list", signed, "--json")
    assert r.code == 0, r.err
    m = json.loads(r.out)["models"][0]
    assert {v["key"] for v in m["signatures"].values()} == {fp} and m["config_signature"]["key"] == fp
    assert fp[:16] in cli("repo", "list", signed).out
    plain = tmp_path / "plain"
    publish(linear(tmp_path / "c.onnx"), plain, "m")
    assert "unsigned" in cli("repo", "list", plain).out


def test_bad_key_is_a_usage_error(tmp_path, cli):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    r = cli("publish", linear(tmp_path / "d.onnx"), "--repo", tmp_path / "r", "--name", "m", "--sign-key", bad)
    assert r.code == 2 and "bad.pem" in r.err
    assert not (tmp_path / "r" / "m" / "1").exists()


# ---- deploy: annotations, and refusal before anything is written --------------------------------------
def test_deploy_kserve_carries_the_signatures_and_refuses_a_tampered_repository(tmp_path, keys, cli):
    import yaml

    repo = tmp_path / "repo"
    plan = json.loads((Path(__file__).resolve().parents[1] / "examples" / "plan.example.json").read_text())
    model = plan["chosen"]["model"]
    publish(linear(tmp_path / "p.onnx"), repo, model, sign_key=keys["ours"][0])
    plan["repository"] = str(repo)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    args = ["deploy", "kserve", repo, model, "--plan", tmp_path / "plan.json", "--storage-uri", "s3://b/triton",
            "--require-signature", "--trust-key", keys["ours"][1]]
    r = cli(*args, "-o", tmp_path / "k8s")
    assert r.code == 0, r.err
    from retool.publish.signing import fingerprint

    meta = yaml.safe_load((tmp_path / "k8s" / "inferenceservice.yaml").read_text())["metadata"]
    assert meta["annotations"]["retool/signature"] == f"s3://b/triton/{model}/1/model.sig"
    assert meta["annotations"]["retool/config-signature"] == f"s3://b/triton/{model}/config.sig"
    assert meta["annotations"]["retool/signed-by"] == f"sha256:{fingerprint(keys['ours'][1])}"
    _flip_byte(repo / model / "1" / "model.onnx")
    r = cli(*args, "-o", tmp_path / "k8s2")
    assert r.code == 7 and "model.onnx" in r.err, r.err
    assert not (tmp_path / "k8s2").exists()


# ---- S3 (moto) ------------------------------------------------------------------------------------------
@pytest.fixture
def s3():
    from fixtures.s3 import moto_endpoint, new_bucket

    with moto_endpoint() as url:
        yield new_bucket(url)


def test_signed_repository_on_s3(s3, tmp_path, keys, cli):
    client, bucket = s3
    url = f"s3://{bucket}/triton"
    r = cli("publish", linear(tmp_path / "s.onnx", external_data_mb=0.2), "--repo", url, "--name", "m",
            "--sign-key", keys["ours"][0], "--alias", "production")
    assert r.code == 0, r.err
    keys_ = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="triton/m/")["Contents"]}
    assert {"triton/m/1/model.sig", "triton/m/config.sig"} <= keys_
    assert not [k for k in keys_ if "/.staging/" in k]
    sig = tmp_path / "s3.sig"
    sig.write_bytes(client.get_object(Bucket=bucket, Key="triton/m/1/model.sig")["Body"].read())
    manifest = json.loads(client.get_object(Bucket=bucket, Key="triton/m/1/manifest.json")["Body"].read())
    assert _signed_files(sig) == set(manifest["files"]) | {"manifest.json"} == \
        {k.removeprefix("triton/m/1/") for k in keys_ if k.startswith("triton/m/1/")} - {"model.sig"}
    r = _verify(cli, url, keys["ours"][1])
    assert r.code == 0, r.out + r.err
    r = _verify(cli, url, keys["theirs"][1])
    assert r.code == 7 and ".sig" in r.err
    client.put_object(Bucket=bucket, Key="triton/m/1/extra.bin", Body=b"x")
    r = _verify(cli, url, keys["ours"][1])
    assert r.code == 7 and "extra.bin" in r.out and "not signed" in r.out, r.out
    client.delete_object(Bucket=bucket, Key="triton/m/1/extra.bin")
    als = json.loads(client.get_object(Bucket=bucket, Key="triton/m/aliases.json")["Body"].read())
    als["aliases"]["production"]["history"] = [7]
    client.put_object(Bucket=bucket, Key="triton/m/aliases.json", Body=json.dumps(als).encode())
    r = _verify(cli, url, keys["ours"][1])
    assert r.code == 7 and "aliases.json" in r.err, r.out + r.err
    body = bytearray(client.get_object(Bucket=bucket, Key="triton/m/1/model.onnx")["Body"].read())
    body[-1] ^= 0xFF
    client.put_object(Bucket=bucket, Key="triton/m/1/model.onnx", Body=bytes(body))
    r = _verify(cli, url, keys["ours"][1])
    assert r.code == 7 and "m/1/model.onnx" in r.err, r.err


# ---- serve: refused before a server starts ---------------------------------------------------------------
def _tritons_for(repo: Path) -> list:
    psutil = pytest.importorskip("psutil")
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if (p.info["name"] or "").startswith("tritonserver") and str(repo) in " ".join(p.info["cmdline"] or ()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


@pytest.mark.slow
def test_serve_require_signature_refuses_a_tampered_repository_and_starts_on_a_good_one(signed, keys):
    import os
    import signal

    psutil = pytest.importorskip("psutil")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-m", "retool", "serve", str(signed), "--require-signature", "--trust-key",
            str(keys["ours"][1])]
    p = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # intact: it serves
        for line in p.stdout:
            if line.startswith("Triton (pid"):
                break
        assert p.poll() is None, p.stderr.read()
        assert [c for c in psutil.Process(p.pid).children(recursive=True) if c.name().startswith("tritonserver")]
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(60)
    _flip_byte(signed / "m" / "1" / "a.onnx.data")
    r = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 7, r.stderr
    assert "a.onnx.data" in r.stderr and "Triton (pid" not in r.stdout
    assert not _tritons_for(signed)


def test_pipeline_signing_block_signs_what_it_publishes(tmp_path, keys, cli, monkeypatch):
    import retool

    monkeypatch.setenv("RETOOL_TEST_KEYS", str(keys["ours"][0].parent))  # as CI writes a secret to $RUNNER_TEMP
    repo = tmp_path / "repo"
    doc = {"version": 1, "repository": str(repo),
           "defaults": {"validation": {"batch_sizes": [1], "threads": 1, "latency": False},
                        "gates": {"not_slower": False},
                        "publish": {"when": "gates-pass", "alias": "staging",
                                    "signing": {"key": "$RETOOL_TEST_KEYS/ours.pem"}}},
           "models": [{"name": "lin", "source": str(linear(tmp_path / "lin.onnx")), "targets": ["cpu"]}]}
    res = retool.run(doc, out=tmp_path / "out")
    assert res.passed, [o.message for o in res.outcomes]
    assert (repo / "lin-cpu" / "1" / "model.sig").is_file() and (repo / "lin-cpu" / "config.sig").is_file()
    r = _verify(cli, repo, keys["ours"][1])
    assert r.code == 0, r.out
    doc["defaults"]["publish"]["signing"] = {"key": "k.pem", "kee": "x"}
    from retool.errors import UsageError

    with pytest.raises(UsageError, match="kee"):
        retool.run(doc, out=tmp_path / "out2")


def _ca_and_leaf(folder: Path, stem: str):
    """A CA certificate, and a code-signing certificate it issued with its private key (PEM files)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, pub, signer, ca):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(pub)
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(not ca, False, False, False, False, ca, ca, False, False), critical=True))
        if not ca:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert(f"{stem} CA", f"{stem} CA", ca_key.public_key(), ca_key, True)
    leaf = cert(f"{stem} signer", f"{stem} CA", key.public_key(), ca_key, False)
    paths = {k: folder / f"{stem}.{k}" for k in ("ca.crt", "crt", "pem")}
    paths["ca.crt"].write_bytes(ca.public_bytes(ser.Encoding.PEM))
    paths["crt"].write_bytes(leaf.public_bytes(ser.Encoding.PEM))
    paths["pem"].write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    return paths


def test_certificate_signing_verifies_against_its_ca_offline(tmp_path, cli):
    ours, theirs = _ca_and_leaf(tmp_path, "ours"), _ca_and_leaf(tmp_path, "theirs")
    repo = tmp_path / "repo"
    r = cli("publish", linear(tmp_path / "e.onnx"), "--repo", repo, "--name", "m", "--sign-key", ours["pem"],
            "--sign-cert", ours["crt"])
    assert r.code == 0, r.err
    assert _verify(cli, repo, ours["ca.crt"]).code == 0
    r = _verify(cli, repo, theirs["ca.crt"])
    assert r.code == 7 and "model.sig" in r.out, r.out
    assert "signed (certificate" in cli("repo", "list", repo).out
    r = cli("publish", linear(tmp_path / "f.onnx", seed=5), "--repo", repo, "--name", "m", "--sign-key",
            theirs["pem"], "--sign-cert", ours["crt"])
    assert r.code == 2 and "theirs.pem" in r.err and "does not match" in r.err, r.err
    assert sorted(p.name for p in (repo / "m").iterdir() if p.name.isdigit()) == ["1"]


@pytest.mark.parametrize("cmd", [["repo", "check", "{repo}", "m"], ["loadtest", "{repo}", "m"],
                                 ["plan", "{repo}", "m", "--budget-p99-ms", "10", "--rate", "5"]])
def test_commands_that_start_a_server_refuse_a_tampered_repository_first(signed, keys, cli, cmd, tmp_path):
    _flip_byte(signed / "m" / "2" / "model.onnx")
    args = [str(signed) if a == "{repo}" else a for a in cmd]
    r = cli(*args, "--require-signature", "--trust-key", keys["ours"][1])
    assert r.code == 7 and "m/2/model.onnx" in r.err, r.err
    assert not _tritons_for(signed)
    r = cli(*args, "--require-signature")
    assert r.code == 2 and "--trust-key" in r.err


def test_repo_show_names_the_signer(signed, keys, cli):
    from retool.publish.signing import fingerprint

    r = cli("repo", "show", signed, "m", "1")
    assert r.code == 0 and f"signature: signed (key {fingerprint(keys['ours'][1])[:16]})" in r.out, r.out


def test_the_report_serving_section_names_the_signer(signed, keys, tmp_path):
    from retool.publish.signing import describe, fingerprint
    from retool.validators.report_serving import serving_html, serving_markdown

    fp = fingerprint(keys["ours"][1])[:16]
    assert describe(signed, "m", 2, verified=True) == f"signed (key {fp}), verified"
    assert describe(signed, "m", 2) == f"signed (key {fp}), unverified"
    plain = tmp_path / "plain"
    publish(linear(tmp_path / "c.onnx"), plain, "m")
    assert describe(plain, "m", 1) == "unsigned"
    plan = json.loads((Path(__file__).resolve().parents[1] / "examples" / "plan.example.json").read_text())
    plan["chosen"]["signature"] = describe(signed, "m", 2, verified=True)
    assert f"| signature | signed (key {fp}), verified |" in serving_markdown(plan)
    assert f"signed (key {fp}), verified" in serving_html(plan)


def test_a_bad_trust_key_is_a_usage_error(signed, keys, cli, tmp_path):
    bad = tmp_path / "bad.pub"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    for b in (bad, tmp_path / "absent.pem", keys["ours"][0].parent):
        r = _verify(cli, signed, b)
        assert r.code == 2 and str(b.name) in r.err and "Traceback" not in r.err, r.err


def test_repo_sign_signs_a_model_published_unsigned_only_when_it_verifies(tmp_path, keys, cli):
    repo = tmp_path / "repo"
    publish(linear(tmp_path / "a.onnx"), repo, "m")
    publish(linear(tmp_path / "b.onnx", seed=4), repo, "m", max_regression="off")
    assert _verify(cli, repo, keys["ours"][1]).code == 7
    _flip_byte(repo / "m" / "2" / "model.onnx")
    r = cli("repo", "sign", repo, "m", "--sign-key", keys["ours"][0])
    assert r.code == 7 and "m/2/model.onnx" in r.err, r.err
    assert not (repo / "m" / "1" / "model.sig").exists() and not (repo / "m" / "config.sig").exists()
    _flip_byte(repo / "m" / "2" / "model.onnx")  # back as published
    r = cli("repo", "sign", repo, "m", "--sign-key", keys["ours"][0])
    assert r.code == 0 and "1, 2" in r.out, r.err
    r = _verify(cli, repo, keys["ours"][1])
    assert r.code == 0, r.out
    assert [e["event"] for e in json.loads((repo / "m" / "history.json").read_text())["history"]][-1] == "sign"
