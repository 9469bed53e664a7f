"""The same repository operations on S3: a real S3-compatible server (moto) on loopback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.onnx_tiny import linear
from fixtures.s3 import moto_endpoint, new_bucket
from retool.errors import PublishError
from retool.publish import open_repo, publish

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_endpoint() as url:  # how a user points retool (botocore) at their endpoint
        yield url


@pytest.fixture
def bucket(s3_endpoint):
    return new_bucket(s3_endpoint)[1]


def _client(endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def _keys(endpoint, bucket, prefix=""):
    resp = _client(endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def test_publish_list_show_verify_diff_promote_rollback_on_s3(s3_endpoint, bucket, tmp_path, cli):
    url = f"s3://{bucket}/triton"
    model = linear(tmp_path / "m.onnx", external_data_mb=0.5)
    r = cli("publish", model, "--repo", url, "--name", "m", "--republish", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["data"]["url"] == f"{url}/m/1"
    other = linear(tmp_path / "o.onnx", seed=3, external_data_mb=0.5)
    assert cli("publish", other, "--repo", url, "--name", "m", "--alias", "staging").code == 0
    keys = _keys(s3_endpoint, bucket, "triton/m/")
    for v, data in ((1, "m.onnx.data"), (2, "o.onnx.data")):
        assert [k for k in keys if k.startswith(f"triton/m/{v}/")] == sorted([
            f"triton/m/{v}/manifest.json", f"triton/m/{v}/model.onnx", f"triton/m/{v}/{data}",
            f"triton/m/{v}/samples.npz"])
    assert not [k for k in keys if "/.staging/" in k]  # staging is cleaned after commit
    cfg_text = _client(s3_endpoint).get_object(Bucket=bucket, Key="triton/m/config.pbtxt")["Body"].read().decode()
    cfg = text_format.Parse(cfg_text, model_config_pb2.ModelConfig())
    assert cfg.platform == "onnxruntime_onnx" and list(cfg.version_policy.specific.versions) == [2]

    r = cli("repo", "list", url, "--json")
    assert json.loads(r.out)["models"][0]["versions"] == [1, 2]
    assert "versions 1, 2" in cli("repo", "show", url, "m").out
    assert json.loads(cli("repo", "show", url, "m", "1", "--json").out)["files"]["m.onnx.data"]["size"] > 0
    r = cli("repo", "diff", url, "m", "1", "2", "--json")
    fields = {d["field"] for d in json.loads(r.out)["differences"]}
    assert "file model.onnx sha256" in fields
    assert cli("repo", "verify", url).code == 0

    assert cli("repo", "promote", url, "m", "1", "--alias", "production").code == 0
    assert cli("repo", "promote", url, "m", "2", "--alias", "production").code == 0
    r = cli("repo", "rollback", url, "m", "--alias", "production")
    assert r.code == 0 and "production -> 1" in r.out
    cfg = text_format.Parse(open_repo(url).config_text("m"), model_config_pb2.ModelConfig())
    assert list(cfg.version_policy.specific.versions) == [1, 2]  # production=1, staging=2

    # one flipped byte in S3 is caught
    s3 = _client(s3_endpoint)
    key = "triton/m/2/model.onnx"
    raw = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    raw[-1] ^= 0x01
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(raw))
    r = cli("repo", "verify", url, "--json")
    assert r.code == 7
    assert [(f["version"], f["problem"]) for f in json.loads(r.out)["findings"]] == [(2, "changed")]
    # a version is never overwritten, on S3 either
    with pytest.raises(PublishError, match="never overwritten"):
        publish(model, url, "m", version=1)


def test_concurrent_publishers_on_s3_claim_distinct_versions(s3_endpoint, bucket, tmp_path):
    url = f"s3://{bucket}/repo"
    model = linear(tmp_path / "m.onnx")
    procs = [subprocess.Popen([sys.executable, "-m", "retool", "-q", "publish", str(model), "--repo", url,
                               "--name", "m", "--republish", "--json"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), [err for rc, _, err in results if rc]
    assert sorted(json.loads(out)["data"]["version"] for _, out, _ in results) == [1, 2, 3, 4]
    repo = open_repo(url)
    assert repo.versions("m") == [1, 2, 3, 4] and repo.verify() == ([], 12)  # model, samples, manifest
    claims = _keys(s3_endpoint, bucket, "repo/m/.versions/")
    assert claims == [f"repo/m/.versions/{v}.claim" for v in (1, 2, 3, 4)]


def test_claimed_but_uncommitted_version_is_invisible_and_skipped(s3_endpoint, bucket, tmp_path):
    """A publisher that died after claiming N leaves N unused; the next one takes N+1."""
    url = f"s3://{bucket}/r"
    model = linear(tmp_path / "m.onnx")
    s3 = _client(s3_endpoint)
    s3.put_object(Bucket=bucket, Key="r/m/.versions/1.claim", Body=b"{}")
    s3.put_object(Bucket=bucket, Key="r/m/.staging/deadhost-1-abc/model.onnx", Body=b"partial")
    repo = open_repo(url)
    assert repo.versions("m") == []
    assert publish(model, url, "m").version == 2
    assert repo.versions("m") == [2] and repo.verify() == ([], 3)  # model, samples, manifest
    # a half-copied version folder (no manifest: the commit marker) is not listed, and verify reports it
    s3.put_object(Bucket=bucket, Key="r/m/3/m.onnx.data", Body=b"x")
    assert repo.versions("m") == [2]
    findings, _ = repo.verify()
    assert [(f.version, f.problem) for f in findings] == [(3, "incomplete")]


def test_missing_bucket_is_one_line_not_a_traceback(s3_endpoint, tmp_path, cli):
    model = linear(tmp_path / "m.onnx")
    r = cli("publish", model, "--repo", "s3://no-such-bucket-retool/x", "--name", "m")
    assert r.code == 7 and "create the bucket" in r.err and "Traceback" not in r.err
    r = cli("repo", "list", "s3://no-such-bucket-retool/x")
    assert r.code == 2 and "no model repository" in r.err


def test_publisher_killed_mid_upload_leaves_nothing_visible_on_s3(s3_endpoint, bucket, tmp_path):
    import signal
    import time

    url = f"s3://{bucket}/k"
    model = linear(tmp_path / "m.onnx", external_data_mb=0.5)
    p = subprocess.Popen([sys.executable, "-m", "retool", "-q", "publish", str(model), "--repo", url, "--name", "m"],
                         cwd=ROOT, env={**os.environ, "RETOOL_TEST_STAGE_DELAY_S": "60"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not _keys(s3_endpoint, bucket, "k/m/.staging/") and p.poll() is None:
        time.sleep(0.05)
    staged = _keys(s3_endpoint, bucket, "k/m/.staging/")
    assert staged and staged[0].endswith("/m.onnx.data"), p.stderr.read() if p.poll() is not None else staged
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    repo = open_repo(url)
    assert repo.models() == [] and repo.verify() == ([], 0)
    assert [k for k in _keys(s3_endpoint, bucket, "k/") if not k.startswith("k/m/.staging/")] == []
    assert publish(model, url, "m").version == 1 and repo.verify() == ([], 4)  # + samples.npz
    assert _keys(s3_endpoint, bucket, "k/m/.staging/") == []  # the dead publisher's upload was swept


def test_repo_check_pulls_an_s3_repository_into_a_cache_and_serves_it(s3_endpoint, bucket, tmp_path, monkeypatch):
    from retool.serve.check import check

    monkeypatch.setenv("RETOOL_CACHE_DIR", str(tmp_path / "cache"))  # the Triton home is rebuilt there: seconds
    url = f"s3://{bucket}/serve"
    publish(linear(tmp_path / "m.onnx"), url, "m", max_batch_size=2)
    rep = check(url, "m")
    (m,) = rep["models"]
    assert m["passed"] and len(m["parity"]) == 4
    pulled = list((tmp_path / "cache" / "repos").glob("*/m/1/model.onnx"))
    assert pulled and not list((tmp_path / "cache" / "repos").glob("*/m/.*"))  # no staging or claims
