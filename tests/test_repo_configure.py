"""A config revision (issue 20 item 2): a serving profile applied to an unchanged model rewrites
config.pbtxt without a new version, is recorded in the model's history, and verify keeps passing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures.onnx_tiny import linear
from retool.publish import open_repo, publish

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def config(repo, name="m"):
    return text_format.Parse((Path(repo) / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.fixture
def tiny(tmp_path) -> Path:
    (tmp_path / "src").mkdir()
    return linear(tmp_path / "src" / "tiny.onnx")


@pytest.fixture
def profile(tmp_path) -> Path:
    from retool.serve.profile import ServingConfig, ServingProfile

    cfg = ServingConfig(instance_count=2, intra_op_thread_count=1, dynamic_batching=True,
                        max_queue_delay_microseconds=500, preferred_batch_size=(4,))
    meas = {"throughput": 659.0, "p99_ms": 3.1, "budget_p99_ms": 10.0}
    return ServingProfile("m", cfg, meas).save(tmp_path / "serving.json")


def _versions(repo):
    return sorted(p.name for p in (Path(repo) / "m").iterdir() if p.name.isdigit())


def test_repo_configure_rewrites_the_config_without_a_new_version(tmp_path, tiny, profile, cli, monkeypatch):
    repo = tmp_path / "repo"
    publish(tiny, repo, "m")
    before = config(repo)
    assert before.instance_group[0].count == 1 and before.dynamic_batching.max_queue_delay_microseconds == 100
    default = open_repo(repo).default_serving_config("m")
    monkeypatch.setenv("RETOOL_PUBLISHER", "alice")
    r = cli("repo", "configure", repo, "m", "--profile", profile)
    assert r.code == 0, r.err
    assert "1 inst" in r.out and "2 inst x 1 thr, batching 500 us" in r.out
    after = config(repo)
    assert after.instance_group[0].count == 2
    assert after.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(after.dynamic_batching.preferred_batch_size) == [4]
    assert after.parameters["intra_op_thread_count"].string_value == "1"
    assert _versions(repo) == ["1"]
    # verify still passes: the index records the new config
    assert cli("repo", "verify", repo).code == 0
    hist = open_repo(repo).history("m")
    e = hist[-1]
    assert e["event"] == "configure" and e["version"] == 1 and e["by"] == "alice" and e["at"]
    assert e["old"]["instance_count"] == 1 and e["new"]["instance_count"] == 2
    assert e["new"]["dynamic_batching"]["max_queue_delay_microseconds"] == 500
    assert e["measurement"]["throughput"] == 659.0
    # the published configuration, and the default publish wrote, are readable by other code
    repo_obj = open_repo(repo)
    now = repo_obj.serving_config("m")
    assert (now.instance_count, now.intra_op_thread_count, now.max_queue_delay_microseconds) == (2, 1, 500)
    assert repo_obj.default_serving_config("m") == default
    assert default.instance_count == 1 and default.dynamic_batching and default.max_queue_delay_microseconds == 100
    from retool.publish.config import config_json
    from retool.serve.tune import from_config

    assert from_config(config_json((repo / "m" / "config.pbtxt").read_text())) == now


def test_publish_with_a_profile_on_an_unchanged_model_is_a_config_revision(tmp_path, tiny, profile, cli):
    repo = tmp_path / "repo"
    assert cli("publish", tiny, "--repo", repo, "--name", "m").code == 0
    r = cli("publish", tiny, "--repo", repo, "--name", "m", "--serving-profile", profile)
    assert r.code == 0, r.err
    assert "no new version made" in r.out and "serving configuration revised" in r.out
    assert _versions(repo) == ["1"]
    assert config(repo).instance_group[0].count == 2
    assert cli("repo", "verify", repo).code == 0
    assert [e["event"] for e in open_repo(repo).history("m")] == ["publish", "configure"]
    r = cli("publish", tiny, "--repo", repo, "--name", "m", "--serving-profile", profile, "--json")
    data = json.loads(r.out)["data"]
    assert r.code == 0 and data["unchanged"] and data["configured"]["new"]["instance_count"] == 2


def test_configure_a_served_alias_and_later_versions(tmp_path, tiny, profile):
    repo = tmp_path / "repo"
    publish(tiny, repo, "m")
    publish(linear(tmp_path / "src" / "b.onnx", seed=2), repo, "m")
    r = open_repo(repo)
    r.promote("m", 1, "production")  # config serves version 1: configure defaults to it
    assert r.configure("m", profile)["version"] == 1
    assert config(repo).instance_group[0].count == 2
    assert r.verify() == ([], 6)
    r.promote("m", 2, "production")  # version 2 has no profile: its own settings
    assert config(repo).instance_group[0].count == 1
    assert r.verify()[0] == []
    events = [e["event"] for e in r.history("m")]
    assert events == ["publish", "publish", "promote", "configure", "promote"]


def test_configure_bad_input_is_one_line(tmp_path, tiny, profile, cli):
    repo = tmp_path / "repo"
    publish(tiny, repo, "m")
    cfg_before = (repo / "m" / "config.pbtxt").read_text()
    r = cli("repo", "configure", repo, "m", "--profile", tmp_path / "nope.json")
    assert r.code == 2 and "not found" in r.err and "Traceback" not in r.err
    r = cli("repo", "configure", repo, "m", "--profile", profile, "--version", "7")
    assert r.code == 2 and "no version 7" in r.err
    r = cli("repo", "configure", repo, "nomodel", "--profile", profile)
    assert r.code == 2 and "no model named" in r.err
    big = json.loads(profile.read_text())
    big["config"]["instance_count"] = 10**9
    (tmp_path / "big.json").write_text(json.dumps(big))
    r = cli("repo", "configure", repo, "m", "--profile", tmp_path / "big.json")
    assert r.code == 2 and "1024" in r.err and "Traceback" not in r.err
    assert (repo / "m" / "config.pbtxt").read_text() == cfg_before
    assert not (repo / "m" / "serving.json").exists()
