"""retool run's serve: step: a real Triton checks, load-tests and tunes what the pipeline published."""
import json

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from fixtures import onnx_models
from retool.errors import UsageError

# budgets met or missed by real timings: run alone (make test's serial phase), not beside another worker
pytestmark = pytest.mark.serial


def _doc(src, repo, serve):
    return {"version": 1, "repository": str(repo),
            "defaults": {"validation": {"batch_sizes": [1, 4], "threads": 1, "latency": False},
                         "serve": serve},
            "models": [{"name": "lin", "source": str(src), "targets": ["cpu"]}]}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return onnx_models.linear(tmp_path_factory.mktemp("src") / "lin.onnx", seed=1)


@pytest.mark.slow
def test_serve_step_checks_tunes_and_applies_the_profile(tmp_path, src):
    import retool

    repo = tmp_path / "repo"
    serve = {"check": True, "budget_p99_ms": 1000, "concurrency": [1, 2], "window_ms": 400, "space": "small",
             "cost_per_hour": 1.5}
    res = retool.run(_doc(src, repo, serve), out=tmp_path / "out")
    assert res.exit_code == 0, res.summary_md.read_text()
    s = json.loads(res.summary_json.read_text())["targets"][0]["stages"]["serve"]
    assert s["status"] == "ok" and s["check"]["passed"]
    assert {(p["protocol"], p["batch"]) for p in s["check"]["parity"]} == {("http", 1), ("http", 4), ("grpc", 1),
                                                                          ("grpc", 4)}
    ch = s["load"]["chosen"]
    assert s["load"]["met"] and ch["p99_ms"] <= 1000 and ch["cost_per_million"] > 0
    if s["load"].get("kept_published"):  # the published configuration won, or was not beaten beyond the noise
        assert not (repo / "lin-cpu" / "serving.json").exists()
    else:
        applied = json.loads((repo / "lin-cpu" / "serving.json").read_text())["versions"]["1"]
        assert applied["serving_profile"]["measurement"]["p99_ms"] == pytest.approx(ch["p99_ms"])
    cfg = text_format.Parse((repo / "lin-cpu" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.instance_group[0].count == ch["config"]["instance_count"]
    assert cfg.HasField("dynamic_batching") == ch["config"]["dynamic_batching"]
    md = res.summary_md.read_text()
    assert "## Serving in a real Triton" in md and "p99 ≤ 1000 ms" in md and ch["label"] in md
    assert (tmp_path / "out" / "lin" / "cpu" / "serve" / "plot.svg").exists()


@pytest.mark.slow
def test_a_budget_nothing_meets_fails_the_serve_gate_with_exit_6(tmp_path, src):
    import retool

    serve = {"budget_p99_ms": 0.001, "concurrency": [1], "window_ms": 400, "space": "small"}
    res = retool.run(_doc(src, tmp_path / "repo", serve), out=tmp_path / "out")
    assert res.exit_code == 6
    o = res.outcomes[0]
    assert o.status == "failed" and o.code == 6 and "no configuration meets p99 <= 0.001 ms" in o.message
    assert not (tmp_path / "repo" / "lin-cpu" / "serving.json").exists()  # nothing applied
    assert "no configuration meets" in res.summary_md.read_text()


def test_serve_section_is_checked_like_the_rest_of_the_file(tmp_path, src):
    from retool.pipeline.config import load_config

    p = tmp_path / "retool.yaml"
    p.write_text(yaml.safe_dump(_doc(src, tmp_path / "repo", {"budget_p99": 5})))
    with pytest.raises(UsageError) as ei:
        load_config(p)
    assert "unknown key 'budget_p99'" in str(ei.value) and "budget_p99_ms" in str(ei.value)
    p.write_text(yaml.safe_dump(_doc(src, tmp_path / "repo", {"budget_p99_ms": 5, "space": "quick"})))
    assert load_config(p).models[0].targets[0].serve == {"budget_p99_ms": 5, "space": "quick"}


@pytest.mark.slow
def test_a_rerun_keeps_the_published_configuration_unless_beaten_beyond_the_noise(tmp_path, src):
    import retool

    repo = tmp_path / "repo"
    serve = {"check": False, "budget_p99_ms": 1000, "concurrency": [1, 2], "window_ms": 400, "space": "small"}
    first = retool.run(_doc(src, repo, serve), out=tmp_path / "out")
    assert first.exit_code == 0, first.summary_md.read_text()
    config_before = (repo / "lin-cpu" / "config.pbtxt").read_text()
    again = retool.run(_doc(src, repo, serve), out=tmp_path / "out")  # unchanged: the same out, its cache
    assert again.exit_code == 0, again.summary_md.read_text()
    load = json.loads(again.summary_json.read_text())["targets"][0]["stages"]["serve"]["load"]
    rep = json.loads((tmp_path / "out" / "lin" / "cpu" / "serve" / "report.json").read_text())
    if load.get("kept_published"):
        # kept: config.pbtxt is byte for byte what the first run wrote, and the verdict says why
        assert (repo / "lin-cpu" / "config.pbtxt").read_text() == config_before
        assert rep["chosen"]["config"] == rep["published"]
    else:
        # changed: only because the decision rule said the new one is better beyond the noise
        assert rep["decision"]["outcome"] == "pass", rep["decision"]
        assert "better than the published configuration beyond the noise" in load["verdict"]


@pytest.mark.slow
def test_a_models_plan_section_plans_its_published_family(tmp_path, src):
    import retool

    doc = _doc(src, tmp_path / "repo", {"check": False})
    doc["models"][0]["plan"] = {"budget_p99_ms": 500, "rate": 20, "price_per_hour": 1.0, "window_ms": 400}
    res = retool.run(doc, out=tmp_path / "out")
    assert res.exit_code == 0, res.summary_md.read_text()
    plans = json.loads(res.summary_json.read_text())["plans"]
    assert len(plans) == 1 and plans[0]["status"] == "ok" and plans[0]["chosen"]["model"] == "lin-cpu"
    plan = json.loads((tmp_path / "out" / "lin" / "plan" / "plan.json").read_text())
    assert plan["kind"] == "retool-serving-plan" and plan["chosen"]["replicas"] >= 1
    assert "## Serving plan" in res.summary_md.read_text()
    html = (tmp_path / "out" / "lin" / "cpu" / "report" / "report.html")
    assert plans[0]["report"] == str(html) and "Serving" in html.read_text()
    assert json.loads(html.with_suffix(".json").read_text())["data"]["serving"]["chosen"]["model"] == "lin-cpu"
