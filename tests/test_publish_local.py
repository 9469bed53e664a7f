"""Publish to a local Triton model repository: layout, manifests, gates, aliases, verify."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fixtures.onnx_tiny import linear
from retool.errors import PublishError, UsageError
from retool.publish import open_repo, publish
from retool.types import CheckResult, Report

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def triton_config(path) -> "model_config_pb2.ModelConfig":
    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def make_report(art_path=None, *, passed=True, p99=None, cosine=0.9999, stage="validate", batch_sizes=None) -> Report:
    from retool.onnx_info import artifact_from_onnx

    checks = [CheckResult("parity[y]", passed, details={"cosine": cosine})]
    data = {}
    if batch_sizes:
        data["parity_batch_sizes"] = list(batch_sizes)
    if p99 is not None:
        data["latency"] = {"candidate": {str(b): {"p99_ms": p99 * b, "p50_ms": p99 * b / 2}
                                         for b in (batch_sizes or [1])}}
    return Report(stage, artifact_from_onnx(art_path) if art_path else None, checks, data)


@pytest.fixture
def tiny(tmp_path) -> Path:
    (tmp_path / "src").mkdir()
    return linear(tmp_path / "src" / "tiny.onnx")


@pytest.fixture
def tiny_ext(tmp_path) -> Path:
    (tmp_path / "ext").mkdir()
    return linear(tmp_path / "ext" / "big.onnx", seed=1, external_data_mb=1)


def test_publish_layout_manifest_and_triton_config(tmp_path, tiny_ext, cli):
    repo = tmp_path / "repo"
    r = cli("publish", tiny_ext, "--repo", repo, "--name", "tiny", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["stage"] == "publish" and out["data"]["version"] == 1
    vdir = repo / "tiny" / "1"
    assert sorted(p.name for p in vdir.iterdir()) == ["big.onnx.data", "manifest.json", "model.onnx", "samples.npz"]
    m = json.loads((vdir / "manifest.json").read_text())
    from retool.fsutil import sha256_file

    assert m["files"]["model.onnx"]["sha256"] == sha256_file(tiny_ext)
    assert m["files"]["big.onnx.data"]["sha256"] == sha256_file(tiny_ext.parent / "big.onnx.data")
    assert m["provenance"]["source_sha256"] == sha256_file(tiny_ext) and m["provenance"]["opset"] == 17
    assert m["published"]["user"] and m["published"]["host"] and m["published"]["at"]
    assert m["retool_version"] and m["forced"] is False
    # Triton's schema accepts the config; batching is on because the batch axis is dynamic
    cfg = triton_config(repo / "tiny" / "config.pbtxt")
    assert cfg.name == "tiny" and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 8 and cfg.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("x", model_config_pb2.TYPE_FP32, [4])]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("y_out", [3])]
    assert cfg.version_policy.WhichOneof("policy_choice") == "latest"
    # the published model, with its external data, loads and runs from the repository
    import onnxruntime as ort

    sess = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.ones((2, 4), np.float32)
    ref = ort.InferenceSession(str(tiny_ext), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], ref)


def test_versions_increment_and_are_never_overwritten(tmp_path, tiny):
    repo = tmp_path / "repo"
    assert [publish(tiny, repo, "m", republish=True).version for _ in range(3)] == [1, 2, 3]
    before = (repo / "m" / "2" / "manifest.json").read_bytes()
    with pytest.raises(PublishError, match="never overwritten"):
        publish(tiny, repo, "m", republish=True, version=2)
    assert (repo / "m" / "2" / "manifest.json").read_bytes() == before
    assert publish(tiny, repo, "m", republish=True, version=10).version == 10
    assert publish(tiny, repo, "m", republish=True).version == 11
    assert open_repo(repo).versions("m") == [1, 2, 3, 10, 11]
    assert not [p for p in (repo / "m").iterdir() if p.name.startswith(".staging")]


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".hidden", "x\\y", "", "a" * 200])
def test_bad_names_are_refused_before_anything_is_written(tmp_path, tiny, cli, bad):
    repo = tmp_path / "repo"
    r = cli("publish", tiny, "--repo", repo, "--name", bad)
    assert r.code == 2 and "model name" in r.err and "Traceback" not in r.err
    assert not repo.exists() and not (tmp_path / "x").exists()


def test_bad_versions_and_aliases_are_usage_errors(tmp_path, tiny):
    with pytest.raises(UsageError, match="positive integer"):
        publish(tiny, tmp_path / "r", "m", version="0")
    with pytest.raises(UsageError, match="positive integer"):
        publish(tiny, tmp_path / "r", "m", version="../1")
    with pytest.raises(UsageError, match="alias"):
        publish(tiny, tmp_path / "r", "m", alias="Prod/../x")


def test_failing_report_is_refused_and_a_forced_publish_is_recorded(tmp_path, tiny, cli):
    repo = tmp_path / "repo"
    rep = tmp_path / "failing.json"
    rep.write_text(make_report(tiny, passed=False, cosine=0.5).to_json())
    r = cli("publish", tiny, "--repo", repo, "--name", "m", "--report", rep)
    assert r.code == 7 and "report failed" in r.err and "parity[y]" in r.err
    assert not repo.exists()  # refused before anything was staged
    r = cli("publish", tiny, "--repo", repo, "--name", "m", "--report", rep, "--force")
    assert r.code == 0 and "FORCED" in r.out
    m = open_repo(repo).manifest("m", 1)
    assert m["forced"] is True and "parity[y]" in m["forced_reasons"][0]
    assert m["readiness"]["passed"] is False and m["readiness"]["failed_checks"] == ["parity[y]"]
    assert m["report"]["checks"][0]["details"]["cosine"] == 0.5
    assert "FORCED" in cli("repo", "show", repo, "m", "1").out


def test_regression_gate_against_the_latest_version(tmp_path, tiny):
    repo = tmp_path / "repo"
    publish(tiny, repo, "m", republish=True, report=make_report(tiny, p99=10.0, cosine=0.9999))
    # 50 % slower at p99: refused by the default gate, with the numbers in the message
    with pytest.raises(PublishError, match=r"regression\.latency vs v1.*\+50\.0%"):
        publish(tiny, repo, "m", republish=True, report=make_report(tiny, p99=15.0))
    # parity dropped by 0.05 > 0.01
    with pytest.raises(PublishError, match=r"regression\.parity vs v1"):
        publish(tiny, repo, "m", republish=True, report=make_report(tiny, p99=10.0, cosine=0.95))
    # a looser limit lets it through; the checks are recorded
    res = publish(tiny, repo, "m", republish=True, report=make_report(tiny, p99=15.0), max_regression="latency=60%")
    assert res.version == 2 and not res.forced
    lat = next(c for c in res.regression if c.name.startswith("regression.latency"))
    assert lat.passed and lat.value == pytest.approx(50.0) and lat.details["metric"] == "p99_ms"
    # bigger model: the size gate compares file sizes
    big = linear(tmp_path / "big.onnx", features=64)
    with pytest.raises(PublishError, match=r"regression\.size vs v2"):
        publish(big, repo, "m", max_regression="latency=off,cosine=off")
    res = publish(big, repo, "m", report=make_report(big, p99=10.0), max_regression="off")
    assert res.version == 3 and all(c.severity == "info" for c in res.regression)
    # forcing through a regression is recorded
    res = publish(tiny, repo, "m", republish=True, report=make_report(tiny, p99=100.0), force=True)
    assert res.forced and any("regression" in r for r in res.manifest["forced_reasons"])


def test_manifest_carries_the_optimize_chain_and_calibration_digest(tmp_path, tiny):
    import dataclasses

    from retool.onnx_info import artifact_from_onnx
    from retool.types import ProvenanceStep

    base = artifact_from_onnx(tiny)
    conv = dataclasses.replace(base, provenance=(ProvenanceStep(
        "convert", "torch.onnx.export", {"torch": "2.13.0"}, {"framework": "torch", "source": "net.pt"},
        "ab" * 32, base.sha256),))
    opt = conv.derive(tiny, ProvenanceStep("optimize", "onnxruntime.quantization", {"onnxruntime": "1.32"},
                                           {"target": "cpu-int8", "calibration_sha256": "cd" * 32},
                                           base.sha256, base.sha256), target="cpu-int8", precision="int8")
    m = publish(opt, tmp_path / "repo", "m").manifest
    prov = m["provenance"]
    assert prov["source_sha256"] == "ab" * 32 and prov["framework"] == "torch" and prov["source"] == "net.pt"
    assert prov["versions"] == {"torch": "2.13.0", "onnxruntime": "1.32"}
    assert prov["calibration"] == {"calibration_sha256": "cd" * 32}
    assert [s["stage"] for s in prov["chain"]] == ["convert", "optimize"]
    assert prov["target"] == "cpu-int8" and m["artifact"]["precision"] == "int8"
    # a ModelArtifact whose file changed after it was read is refused
    linear(tiny, seed=5)
    with pytest.raises(PublishError, match="changed since"):
        publish(opt, tmp_path / "repo", "m")


def test_missing_metrics_are_said_not_compared(tmp_path, tiny):
    repo = tmp_path / "repo"
    publish(tiny, repo, "m", republish=True)
    res = publish(tiny, repo, "m", republish=True, report=make_report(tiny, p99=1.0))
    notes = {c.name.split(" ")[0]: (c.severity, c.message) for c in res.regression}
    assert notes["regression.latency"] == ("info", "not compared: v1's report has no batch-1 latency")
    assert notes["regression.size"][0] == "gate"


def test_gate_also_compares_against_production(tmp_path, tiny):
    repo = tmp_path / "repo"
    publish(tiny, repo, "m", republish=True, report=make_report(tiny, p99=10.0))
    open_repo(repo).promote("m", 1, "production")
    publish(tiny, repo, "m", republish=True, report=make_report(tiny, p99=11.5))  # +15 % vs v1: passes
    with pytest.raises(PublishError, match=r"vs v1") as exc:  # +13 % vs latest v2 but +30 % vs production v1
        publish(tiny, repo, "m", republish=True, report=make_report(tiny, p99=13.0), max_regression="latency=25%")
    assert "vs v2" not in str(exc.value)


def test_tampering_with_one_byte_is_caught(tmp_path, tiny_ext, cli):
    repo = tmp_path / "repo"
    publish(tiny_ext, repo, "m", republish=True)
    publish(tiny_ext, repo, "m", republish=True)
    assert cli("repo", "verify", repo).code == 0
    data = repo / "m" / "2" / "big.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    r = cli("repo", "verify", repo, "--json")
    assert r.code == 7 and "changed" in r.err
    found = json.loads(r.out)["findings"]
    assert [(f["version"], f["problem"], Path(f["path"]).name) for f in found] == [(2, "changed", "big.onnx.data")]
    # added and missing files too; verify of one model only
    (repo / "m" / "1" / "extra.bin").write_bytes(b"x")
    (repo / "m" / "1" / "model.onnx").unlink()
    r = cli("repo", "verify", repo, "m", "--json")
    probs = sorted((f["version"], f["problem"]) for f in json.loads(r.out)["findings"])
    assert r.code == 7 and probs == [(1, "added"), (1, "missing"), (2, "changed")]
    # a damaged version cannot be promoted
    r = cli("repo", "promote", repo, "m", "2", "--alias", "production")
    assert r.code == 7 and "damaged" in r.err


def test_promote_rollback_move_aliases_and_triton_version_policy(tmp_path, tiny, cli):
    repo = tmp_path / "repo"
    for _ in range(3):
        publish(tiny, repo, "m", republish=True)
    cfg_path = repo / "m" / "config.pbtxt"
    r = cli("repo", "promote", repo, "m", "1", "--alias", "production")
    assert r.code == 0 and "production -> 1" in r.out
    assert list(triton_config(cfg_path).version_policy.specific.versions) == [1]
    assert cli("repo", "promote", repo, "m", "3", "--alias", "production").code == 0
    assert list(triton_config(cfg_path).version_policy.specific.versions) == [3]
    # a staging alias is served too; a new publish does not change what is served
    res = publish(tiny, repo, "m", republish=True, alias="staging")
    assert list(triton_config(cfg_path).version_policy.specific.versions) == [3, 4]
    publish(tiny, repo, "m", republish=True)
    assert list(triton_config(cfg_path).version_policy.specific.versions) == [3, res.version]
    r = cli("repo", "rollback", repo, "m", "--alias", "production")
    assert r.code == 0 and "production -> 1" in r.out
    assert list(triton_config(cfg_path).version_policy.specific.versions) == [1, 4]
    als = json.loads((repo / "m" / "aliases.json").read_text())["aliases"]
    assert als["production"]["version"] == 1 and als["production"]["history"] == []
    r = cli("repo", "rollback", repo, "m", "--alias", "production")
    assert r.code == 7 and "no earlier version" in r.err
    assert cli("repo", "promote", repo, "m", "9").code == 2
    r = cli("repo", "list", repo, "--json")
    models = json.loads(r.out)["models"]
    assert models[0]["name"] == "m" and models[0]["versions"] == [1, 2, 3, 4, 5]
    assert models[0]["aliases"] == {"production": 1, "staging": 4}
    assert cli("repo", "verify", repo).code == 0


def test_show_and_diff(tmp_path, tiny, cli):
    repo = tmp_path / "repo"
    publish(tiny, repo, "m", republish=True, report=make_report(tiny, p99=2.0, cosine=0.99999))
    other = linear(tmp_path / "other.onnx", seed=7)
    publish(other, repo, "m", report=make_report(other, p99=2.2, cosine=0.9999), max_regression="off")
    r = cli("repo", "show", repo, "m")
    assert r.code == 0 and "versions 1, 2" in r.out and 'platform: "onnxruntime_onnx"' in r.out
    r = cli("repo", "show", repo, "m", "2", "--json")
    assert r.code == 0 and json.loads(r.out)["version"] == 2
    r = cli("repo", "diff", repo, "m", "1", "2", "--json")
    diffs = {d["field"]: (d["v1"], d["v2"]) for d in json.loads(r.out)["differences"]}
    assert r.code == 0
    assert diffs["latency p99_ms"] == (2.0, 2.2) and diffs["parity min cosine"] == (0.99999, 0.9999)
    assert diffs["file model.onnx sha256"][0] != diffs["file model.onnx sha256"][1]
    assert "target" not in diffs  # same target: only differences are listed
    assert "file model.onnx sha256" in cli("repo", "diff", repo, "m", "1", "2").out
    assert cli("repo", "diff", repo, "m", "1", "7").code == 2
    assert cli("repo", "list", tmp_path / "nowhere").code == 2


@pytest.mark.parametrize("target,kind,precision_mode", [
    ("tensorrt-int8", "KIND_GPU", "INT8"), ("gpu-fp16", "KIND_GPU", "FP16"), ("cpu-int8", "KIND_CPU", None),
    (None, "KIND_AUTO", None)])
def test_config_follows_the_target(tmp_path, tiny, target, kind, precision_mode):
    import dataclasses

    from retool.onnx_info import artifact_from_onnx

    art = dataclasses.replace(artifact_from_onnx(tiny), target=target)
    publish(art, tmp_path / "repo", "m")
    cfg = triton_config(tmp_path / "repo" / "m" / "config.pbtxt")
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == kind
    accs = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    if precision_mode:
        assert accs[0].name == "tensorrt" and accs[0].parameters["precision_mode"] == precision_mode
    else:
        assert len(accs) == 0


def test_static_batch_and_report_batch_sizes(tmp_path):

    from retool.publish.config import build_config

    # static shapes: no batching, full dims; scalar outputs get Triton's reshape
    text = build_config("s", {"inputs": [{"name": "a", "dtype": "int64", "shape": [2, 5]}],
                              "outputs": [{"name": "n", "dtype": "bool", "shape": []}]})
    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [2, 5] and cfg.input[0].data_type == model_config_pb2.TYPE_INT64
    assert list(cfg.output[0].dims) == [1] and list(cfg.output[0].reshape.shape) == []
    # a report that proved batches up to 32 sets max_batch_size 32
    tiny = linear(tmp_path / "t.onnx")
    publish(tiny, tmp_path / "repo", "m", report=make_report(tiny, p99=1.0, batch_sizes=[1, 8, 32]))
    assert triton_config(tmp_path / "repo" / "m" / "config.pbtxt").max_batch_size == 32
    # proven at batch 1 only: Triton may not batch it (max_batch_size 1, no dynamic batcher)
    publish(tiny, tmp_path / "repo", "one", report=make_report(tiny, batch_sizes=[1]))
    cfg = triton_config(tmp_path / "repo" / "one" / "config.pbtxt")
    assert cfg.max_batch_size == 1 and not cfg.HasField("dynamic_batching") and list(cfg.input[0].dims) == [4]


def test_bad_inputs_one_line_no_traceback(tmp_path, tiny, cli):
    repo = tmp_path / "repo"
    r = cli("publish", tmp_path / "missing.onnx", "--repo", repo, "--name", "m")
    assert r.code == 2 and "not found" in r.err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    r = cli("publish", junk, "--repo", repo, "--name", "m")
    assert r.code == 2 and "not a readable ONNX" in r.err
    bad_rep = tmp_path / "bad.json"
    bad_rep.write_text("{}")
    r = cli("publish", tiny, "--repo", repo, "--name", "m", "--report", bad_rep)
    assert r.code == 2 and "not a retool report" in r.err
    r = cli("publish", tiny, "--repo", repo, "--name", "m", "--max-regression", "speed=3")
    assert r.code == 2 and "--max-regression" in r.err
    assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1
    r = cli("publish", tiny, "--repo", repo, "--name", "m", "--instances", "0")
    assert r.code == 2 and "--instances" in r.err
    assert not (repo / "m" / "1").exists()


def test_provenance_of_a_converted_model(tmp_path, cnn_onnx):
    """The convert sidecar supplies the chain: source hash, framework and library versions."""
    res = publish(cnn_onnx, tmp_path / "repo", "cnn")
    prov = res.manifest["provenance"]
    assert prov["framework"] == "torch" and "torch" in prov["versions"]
    assert prov["chain"][0]["stage"] == "convert" and prov["source"] == "SmallCNN"
    assert prov["source_sha256"] == prov["chain"][0]["input_sha256"]  # None for an in-memory torch model
    assert res.manifest["readiness"]["source"].endswith(".report.json")
    cfg = triton_config(tmp_path / "repo" / "cnn" / "config.pbtxt")
    assert list(cfg.input[0].dims) == [3, 32, 32]


def test_regression_spec_parsing_and_timer_noise():
    from retool.publish import regression as rg

    assert rg.parse_spec(None) == rg.DEFAULT and rg.parse_spec("off") == rg.OFF
    t = rg.parse_spec("latency=5%, cosine=off")
    assert (t.latency_pct, t.size_pct, t.cosine_drop) == (5.0, 10.0, None)
    with pytest.raises(UsageError):
        rg.parse_spec("latency=fast")
    old = {"version": 1, "files": {"model.onnx": {"size": 100}},
           "report": {"data": {"latency": {"candidate_p50_ms": 0.02}}, "checks": []}}
    new = {"data": {"latency": {"candidate_p50_ms": 0.04}}, "checks": []}  # +100 % but only 0.02 ms: noise
    lat = rg.compare(new, 100, old, rg.DEFAULT)[0]
    assert lat.passed and lat.value == pytest.approx(100.0) and lat.details["metric"] == "p50_ms"
    new = {"data": {"latency": {"candidate_p50_ms": 0.2}}, "checks": []}
    assert not rg.compare(new, 100, old, rg.DEFAULT)[0].passed


def test_latency_regression_is_decided_on_the_runs_intervals():
    """With the runs' samples in both reports, growth fails only when its whole interval is over the limit."""
    import numpy as np

    from retool.publish import regression as rg

    rng = np.random.default_rng(0)

    def rep(samples):
        s = [float(x) for x in samples]
        return {"data": {"latency": {"candidate": {"1": {"p50_ms": float(np.median(s)), "p99_ms": max(s),
                                                         "samples_ms": s}}}}, "checks": []}

    base = rng.normal(1.0, 0.05, 400)
    old = {"version": 1, "files": {"model.onnx": {"size": 100}}, "report": rep(base)}
    # the same distribution with a long tail in this run: p99 grew a lot, the p50 did not
    tail = np.concatenate([rng.normal(1.0, 0.05, 392), np.full(8, 3.0)])
    same = rg.compare(rep(tail), 100, old, rg.DEFAULT)[0]
    assert same.passed and same.details["metric"] == "p50_ms" and same.details["decision"]["outcome"] != "fail"
    slower = rg.compare(rep(rng.normal(1.6, 0.05, 400)), 100, old, rg.DEFAULT)[0]
    assert not slower.passed and slower.details["decision"]["outcome"] == "fail" and slower.value > 50
