"""retool run: a pipeline file end to end, its cache, its errors, and its engines."""
import json
from pathlib import Path

import pytest
import yaml

from fixtures import onnx_models


def _write(tmp_path, doc) -> Path:
    p = tmp_path / "retool.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    return {"lin": onnx_models.linear(d / "lin.onnx", seed=1), "two": onnx_models.two_outputs(d / "two.onnx", seed=2)}


def _doc(sources, repo, **over):
    doc = {
        "version": 1,
        "repository": str(repo),
        # these tests are about the pipeline, not speed: tiny int8 models can be slower than fp32, so
        # the default not-slower gate is off here (tests/test_speed.py covers it)
        "defaults": {"validation": {"batch_sizes": [1, 4], "threads": 1, "latency": True, "runs": 5},
                     "gates": {"not_slower": False},
                     "publish": {"when": "gates-pass", "alias": "staging"}},
        "models": [
            {"name": "torchcnn", "source": "fixtures.torch_models:cnn",
             "targets": ["cpu", {"name": "cpu-int8", "tolerance": {"min_cosine": 0.95, "min_top1": 0.5}}]},
            {"name": "lin", "source": str(sources["lin"]), "targets": ["cpu"]},
        ],
    }
    doc.update(over)
    return doc


def _statuses(result):
    return {(o.model, o.target): o.status for o in result.outcomes}


@pytest.mark.slow
def test_multi_model_multi_target_then_cache_then_one_target_rerun(tmp_path, sources):
    import retool

    repo = tmp_path / "repo"
    cfg = _write(tmp_path, _doc(sources, repo))
    out = tmp_path / "out"
    r1 = retool.run(cfg, out=out, workers=2)
    assert r1.exit_code == 0, r1.summary_md.read_text()
    assert _statuses(r1) == {("torchcnn", "cpu"): "ok", ("torchcnn", "cpu-int8"): "ok", ("lin", "cpu"): "ok"}
    for name in ("torchcnn-cpu", "torchcnn-cpu-int8", "lin-cpu"):
        assert (repo / name / "1" / "model.onnx").exists() and (repo / name / "config.pbtxt").exists()
    for f in ("torchcnn/fp32.onnx", "torchcnn/cpu-int8/model.onnx", "torchcnn/cpu-int8/report/report.html",
              "summary.md", "summary.json"):
        assert (out / f).exists(), f
    summary = (out / "summary.md").read_text()
    assert "| torchcnn | cpu-int8 |" in summary and "torchcnn-cpu-int8 v1" in summary

    # nothing changed: every step comes from the cache and nothing new is published
    r2 = retool.run(cfg, out=out, workers=2)
    assert r2.exit_code == 0
    assert set(_statuses(r2).values()) == {"cached"}
    assert all(c["status"] == "cached" for c in r2.converts.values())
    assert not (repo / "torchcnn-cpu" / "2").exists()

    # change one target's settings: only that target runs again
    doc = _doc(sources, repo)
    doc["models"][0]["targets"][1]["tolerance"]["min_cosine"] = 0.9
    r3 = retool.run(_write(tmp_path, doc), out=out, workers=2)
    assert r3.exit_code == 0
    assert _statuses(r3) == {("torchcnn", "cpu"): "cached", ("torchcnn", "cpu-int8"): "ok", ("lin", "cpu"): "cached"}
    assert r3.converts["torchcnn"]["status"] == "cached"
    int8 = {o.target: o for o in r3.outcomes if o.model == "torchcnn"}["cpu-int8"]
    assert int8.stages["optimize"]["status"] == "ok"  # a new tolerance means a new quantization

    # change only a gate: the quantized model is reused, only validation runs again
    doc["models"][0]["targets"][1]["gates"] = {"max_size_mb": 100}
    r4 = retool.run(_write(tmp_path, doc), out=out, workers=2)
    assert r4.exit_code == 0
    int8 = {o.target: o for o in r4.outcomes if o.model == "torchcnn"}["cpu-int8"]
    assert int8.status == "ok" and int8.stages["optimize"]["status"] == "cached"
    assert int8.stages["validate"]["status"] == "ok" and int8.stages["validate"]["seconds"] > 0
    assert not (repo / "torchcnn-cpu-int8" / "3").exists()  # same model file: nothing new published


def test_gate_failure_in_one_model_leaves_the_others_published(tmp_path, sources, cli):
    repo = tmp_path / "repo"
    doc = _doc(sources, repo)
    doc["models"] = [
        {"name": "slow", "source": str(sources["two"]), "targets": ["cpu", "cpu-int8"],
         "gates": {"max_p99_ms": 0.000001}},  # impossible budget
        {"name": "lin", "source": str(sources["lin"]), "targets": ["cpu"]},
    ]
    r = cli("run", _write(tmp_path, doc), "--out", tmp_path / "out")
    assert r.code == 6, r.err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    by = {(t["model"], t["target"]): t for t in summary["targets"]}
    assert by[("slow", "cpu")]["status"] == "failed" and "p99" in by[("slow", "cpu")]["message"]
    assert by[("slow", "cpu-int8")]["status"] == "skipped"  # the model stops at its first failed gate
    assert by[("lin", "cpu")]["status"] == "ok"
    assert (repo / "lin-cpu" / "1" / "model.onnx").exists()
    assert not (repo / "slow-cpu").exists()
    assert "❌ failed" in r.out


def test_publish_always_records_a_forced_publish(tmp_path, sources):
    import retool

    repo = tmp_path / "repo"
    doc = _doc(sources, repo)
    doc["models"] = [{"name": "lin", "source": str(sources["lin"]), "targets": ["cpu"],
                      "gates": {"max_p99_ms": 0.000001}, "publish": {"when": "always"}}]
    res = retool.run(doc, out=tmp_path / "out")
    assert res.exit_code == 6 and res.outcomes[0].status == "failed"  # the gate still fails the run
    manifest = json.loads((repo / "lin-cpu" / "1" / "manifest.json").read_text())
    assert manifest["forced"] is True and manifest["readiness"]["passed"] is False


def test_fail_fast_stops_the_other_models(tmp_path, sources, cli):
    doc = _doc(sources, tmp_path / "repo")
    doc["models"] = [
        {"name": "bad", "source": str(tmp_path / "missing.onnx"), "targets": ["cpu"]},
        {"name": "lin", "source": str(sources["lin"]), "targets": ["cpu"]},
    ]
    r = cli("run", _write(tmp_path, doc), "--out", tmp_path / "out", "--fail-fast")
    assert r.code == 2  # the worst outcome: a missing source is a usage error
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["converts"]["bad"]["status"] == "failed"
    assert {t["model"]: t["status"] for t in summary["targets"]} == {"bad": "skipped", "lin": "skipped"}


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["models"][0].update(tagrets=["cpu"]), "unknown key 'tagrets'; did you mean 'targets'?"),
    (lambda d: d["defaults"]["validation"].update(batch_size=[1]), "did you mean 'batch_sizes'?"),
    (lambda d: d["models"][1].pop("source"), "missing required key 'source'"),
    (lambda d: d["models"][1].update(targets=[{"name": "cpu", "gates": {"max_p99_ms": "fast"}}]),
     "fast is not a number; expected a number > 0"),
    (lambda d: d["defaults"]["publish"].update(when="sometimes"), "not one of gates-pass, always, never"),
])
def test_pipeline_file_errors_name_file_line_and_field(tmp_path, sources, cli, mutate, needle):
    doc = _doc(sources, tmp_path / "repo")
    mutate(doc)
    path = _write(tmp_path, doc)
    r = cli("run", path, "--out", tmp_path / "out")
    assert r.code == 2
    line = r.err.strip().splitlines()[-1]
    assert line.startswith(f"retool: error: {path}:") and needle in line, line
    lineno = int(line.split(f"{path}:")[1].split(":")[0])
    assert lineno > 1  # points into the file, not at its top
    assert not (tmp_path / "out").exists()  # nothing ran


def test_unknown_target_and_bad_yaml(tmp_path, sources, cli):
    p = tmp_path / "bad.yaml"
    p.write_text("models:\n  - name: a\n    source: [unclosed\n")
    r = cli("run", p)
    assert r.code == 2 and f"{p}:" in r.err and "not valid YAML" in r.err
    doc = _doc(sources, tmp_path / "repo")
    doc["models"] = [{"name": "lin", "source": str(sources["lin"]), "targets": ["cpu-int9"]}]
    r = cli("run", _write(tmp_path, doc), "--out", tmp_path / "out")
    assert r.code == 2 and "unknown target 'cpu-int9'; did you mean 'cpu-int8'?" in r.err
    assert not (tmp_path / "out").exists()


def test_python_api_accepts_a_dict_and_only(tmp_path, sources):
    import retool

    doc = _doc(sources, tmp_path / "repo")
    doc["models"] = [{"name": "lin", "source": str(sources["lin"]), "targets": ["cpu", "cpu-int8"]}]
    res = retool.run(doc, out=tmp_path / "out", only="cpu")
    assert res.passed and [o.target for o in res.outcomes] == ["cpu"]


def test_a_worker_that_dies_is_retried(tmp_path, sources, monkeypatch):
    import retool

    marker = tmp_path / "died"
    monkeypatch.setenv("RETOOL_FAULT_INJECT", f"lin:cpu:{marker}")
    doc = _doc(sources, tmp_path / "repo")
    doc["models"] = [{"name": "lin", "source": str(sources["lin"]), "targets": ["cpu"]}]
    res = retool.run(doc, out=tmp_path / "out")
    assert marker.exists()  # the first worker really died
    assert res.passed and res.outcomes[0].status == "ok"


@pytest.mark.slow
def test_ray_engine_on_a_local_instance(tmp_path, sources):
    ray = pytest.importorskip("ray")
    import retool

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        doc = _doc(sources, tmp_path / "repo")
        doc["models"] = [{"name": "lin", "source": str(sources["lin"]), "targets": ["cpu", "cpu-int8"]},
                         {"name": "two", "source": str(sources["two"]), "targets": ["cpu"]}]
        res = retool.run(doc, out=tmp_path / "out", engine="ray")
        assert res.exit_code == 0, res.summary_md.read_text()
        assert {o.status for o in res.outcomes} == {"ok"}
        assert (tmp_path / "out" / "lin" / "cpu-int8" / "model.onnx").exists()  # shipped back by Ray
        assert (tmp_path / "repo" / "two-cpu" / "1" / "model.onnx").exists()
        # a changed gate re-validates on Ray with the cached int8 model shipped to the task
        doc["models"][0]["targets"] = ["cpu", {"name": "cpu-int8", "gates": {"max_size_mb": 50}}]
        res = retool.run(doc, out=tmp_path / "out", engine="ray")
        assert res.exit_code == 0, res.summary_md.read_text()
        int8 = [o for o in res.outcomes if o.target == "cpu-int8"][0]
        assert int8.stages["optimize"]["status"] == "cached" and int8.stages["validate"]["status"] == "ok"
    finally:
        ray.shutdown()


@pytest.mark.parametrize("name", ["demo.yaml", "torch.yaml", "keras.yaml", "caffe.yaml", "decoder.yaml"])
def test_example_pipeline_files_are_valid(name):
    from retool.pipeline.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "examples" / "pipelines" / name)
    assert cfg.models and all(m.targets for m in cfg.models)
