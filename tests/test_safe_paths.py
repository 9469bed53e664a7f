"""Every path made from repository content goes through retool.fsutil.inside: nothing escapes its root.

The S3 case is the one a tester found: a bucket key 'triton/lin//tmp/x/escaped.txt' made `repo check`
write the bucket's bytes to /tmp/x/escaped.txt. It must be refused before anything is written.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from fixtures.onnx_tiny import linear
from retool.errors import UnsafePath
from retool.fsutil import inside, safe_key


@pytest.mark.parametrize("rel", ["/etc/passwd", "a//b", "a/", "..", "a/../../b", "./a", "a/./b", "a\\b", "a\x00b"])
def test_inside_refuses_names_that_could_leave_the_root(tmp_path, rel):
    with pytest.raises(UnsafePath, match="refused the entry"):
        inside(tmp_path, rel)
    with pytest.raises(UnsafePath):
        safe_key(rel)


def test_inside_accepts_plain_names_and_the_root(tmp_path):
    assert inside(tmp_path, "m/1/model.onnx") == tmp_path.resolve() / "m" / "1" / "model.onnx"
    assert inside(tmp_path, "") == tmp_path.resolve()
    with pytest.raises(UnsafePath):
        inside(tmp_path, "", allow_root=False)


def test_inside_refuses_a_symlink_that_leaves_the_root(tmp_path):
    root, outside = tmp_path / "repo", tmp_path / "elsewhere"
    root.mkdir(), outside.mkdir()
    (root / "m").symlink_to(outside)
    (root / "ok").symlink_to(root / "m2", target_is_directory=True)  # a link that stays inside is fine
    with pytest.raises(UnsafePath, match="outside"):
        inside(root, "m/x.txt")
    assert inside(root, "ok/x.txt").name == "x.txt"


def test_local_verify_reports_a_symlinked_file_leaving_the_repository(tmp_path, cli):
    repo = tmp_path / "repo"
    assert cli("publish", linear(tmp_path / "m.onnx"), "--repo", repo, "--name", "m").code == 0
    secret = tmp_path / "secret.txt"
    secret.write_text("not the repository's")
    os.symlink(secret, repo / "m" / "1" / "extra.bin")
    r = cli("repo", "verify", repo, "--json")
    assert r.code != 0
    found = json.loads(r.out)["findings"]
    assert any(f["problem"] == "unsafe-path" for f in found), found


def test_pipeline_model_names_cannot_leave_out(tmp_path, cli):
    for bad in ("../../x", "/abs/path"):
        cfg = tmp_path / "p.yaml"
        cfg.write_text(f"version: 1\nmodels:\n  - name: {bad}\n    source: m.onnx\n")
        r = cli("run", cfg, "--out", tmp_path / "out")
        assert r.code == 2, r.err
        assert "models[0].name" in r.err and "Traceback" not in r.err
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.onnx"))
        assert not Path("/abs/path").exists()


def test_external_data_outside_the_model_folder_is_not_published(tmp_path, cli):
    import onnx

    (tmp_path / "m").mkdir()
    model = linear(tmp_path / "m" / "m.onnx", external_data_mb=0.1)
    m = onnx.load(str(model), load_external_data=False)
    for t in m.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = "../" + kv.value
    (tmp_path / "m" / "m.onnx.data").rename(tmp_path / "m.onnx.data")
    onnx.save(m, str(model))
    r = cli("publish", model, "--repo", tmp_path / "repo", "--name", "m")
    assert r.code == 7 and "external data location" in r.err, r.err
    assert not (tmp_path / "repo" / "m" / "1").exists()


# ---- S3: the reported hole, end to end through the CLI (moto on loopback) -----------------------------


@pytest.fixture
def s3_repo(tmp_path):
    from fixtures.s3 import moto_endpoint, new_bucket

    with moto_endpoint() as url:
        yield new_bucket(url)


@pytest.mark.parametrize("command", [("repo", "check"), ("repo", "verify"), ("serve",), ("loadtest",)])
def test_s3_key_with_an_empty_segment_writes_nothing_outside(s3_repo, tmp_path, cli, command):
    client, bucket = s3_repo
    url = f"s3://{bucket}/triton"
    assert cli("publish", linear(tmp_path / "m.onnx"), "--repo", url, "--name", "lin").code == 0
    escaped = Path("/tmp") / f"retool-escape-{uuid.uuid4().hex[:8]}" / "escaped.txt"
    client.put_object(Bucket=bucket, Key=f"triton/lin/{escaped}", Body=b"from the bucket")
    args = [*command, url] + {("serve",): ["--model", "lin"], ("repo", "verify"): []}.get(command, ["lin"])
    r = cli(*args)
    assert not escaped.exists() and not escaped.parent.exists()
    assert r.code == 7, (r.code, r.err)
    assert "refused the entry" in r.err + r.out and "Traceback" not in r.err
