"""retool loadtest and the budget search, with the real perf_analyzer against a real Triton."""
from __future__ import annotations

import json
import re

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from fixtures.onnx_tiny import linear
from fixtures.proc import run_retool
from retool.publish import open_repo, publish
from retool.serve.loadtest import LoadSpec
from retool.serve.profile import ServingConfig, ServingProfile, load_profile
from retool.serve.session import open_session
from retool.serve.tune import DEFAULT, space, tune

# budgets met or missed by real timings: run alone (make test's serial phase), not beside another worker
pytestmark = pytest.mark.serial

WINDOW = 400  # ms: short windows keep the suite quick; figures from here are plumbing, not benchmarks


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-load")
    publish(linear(root / "lin.onnx"), root / "repo", "lin", max_batch_size=4, max_regression="off")
    return root / "repo"


@pytest.fixture(scope="module")
def sess(repo):
    with open_session(str(repo)) as s:
        yield s


def test_space_keeps_instances_times_threads_within_the_cores():
    for cores in (1, 2, 16):
        for cfg in space("full", 8, cores):
            assert cfg.instance_count * (cfg.intra_op_thread_count or 1) <= max(cores, 1)
    assert space("quick", 8, 2)[0] == DEFAULT
    assert any(c.dynamic_batching for c in space("quick", 8, 2))
    assert not any(c.dynamic_batching for c in space("full", 0, 2))  # no batch axis: no batching to try
    assert {c.preferred_batch_size for c in space("full", 8, 2)} >= {(), (4,), (8,)}


def test_budget_search_returns_a_measured_configuration(repo, sess):
    configs = [DEFAULT, ServingConfig(1, 1, True, 500)]
    rep = tune(sess, open_repo(repo), "lin", LoadSpec(budget_p99_ms=1000.0, concurrency=(1, 2), window_ms=WINDOW,
                                                      price_per_hour=1.0), configs=configs)
    assert rep["met"] and rep["chosen"]["label"] in {c.label for c in configs}
    assert len(rep["configs"]) == 2 and all(len(c["points"]) == 2 for c in rep["configs"])
    p = rep["chosen"]["point"]
    assert p["throughput"] > 0 and 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] <= 1000.0
    assert p["server_ms"] == pytest.approx(p["queue_ms"] + p["compute_ms"])
    best = max(c["best"]["throughput"] for c in rep["configs"])
    assert p["throughput"] == best
    assert rep["chosen"]["cost_per_million"] == pytest.approx(1.0 / (p["throughput"] * 3600) * 1e6)


def test_rate_sweep_measures_each_rate(repo, sess):
    rep = tune(sess, open_repo(repo), "lin", LoadSpec(rates=(50, 100), window_ms=WINDOW), configs="published")
    pts = rep["configs"][0]["points"]
    assert [p["mode"] for p in pts] == ["rate", "rate"] and [p["load"] for p in pts] == [50, 100]
    assert all(p["throughput"] == pytest.approx(p["load"], rel=0.35) for p in pts)


def test_profile_goes_into_config_pbtxt_and_the_manifest(repo, tmp_path):
    prof = ServingProfile("lin", ServingConfig(2, 1, True, 750, (4,)),
                          {"budget_p99_ms": 20.0, "throughput": 123.0, "p99_ms": 9.0})
    path = prof.save(tmp_path / "profile.json")
    assert load_profile(path).config == prof.config
    res = publish(linear(tmp_path / "lin2.onnx", seed=2), repo, "lin", serving_profile=path, max_regression="off")
    text = (repo / "lin" / "config.pbtxt").read_text()
    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert cfg.instance_group[0].count == 2
    assert cfg.parameters["intra_op_thread_count"].string_value == "1"
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 750
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4]
    man = open_repo(repo).manifest("lin", res.version)
    assert man["triton"]["serving_profile"]["measurement"]["throughput"] == 123.0


def test_onnx_metadata_thread_hint_is_the_default_intra_op_threads(tmp_path):
    import onnx

    p = linear(tmp_path / "m.onnx")
    m = onnx.load(p)
    m.metadata_props.add(key="retool.intra_op_threads", value="3")
    onnx.save(m, p)
    publish(p, tmp_path / "repo", "m", max_regression="off")
    cfg = text_format.Parse((tmp_path / "repo" / "m" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.parameters["intra_op_thread_count"].string_value == "3"


@pytest.mark.slow
def test_cli_impossible_budget_exits_6_saying_by_how_much(repo, tmp_path):
    r = run_retool("loadtest", repo, "lin", "--budget-p99-ms", "0.001", "--concurrency", "1", "--window-ms", WINDOW, "--space", "small",
                   "--out", tmp_path / "lt")
    assert r.returncode == 6, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "no configuration meets p99 <= 0.001 ms" in last and "ms over" in last
    rep = json.loads((tmp_path / "lt" / "report.json").read_text())
    assert rep["met"] is False and rep["closest"]["over_budget_ms"] > 0
    svg = (tmp_path / "lt" / "plot.svg").read_text()
    assert svg.startswith("<svg") and "budget p99 0.001 ms" in svg
    assert len(re.findall(r'<g id="curve-\d+"', svg)) == len([c for c in rep["configs"] if c["points"]]) > 0


@pytest.mark.slow
def test_cli_budget_writes_a_profile_that_publish_uses(repo, tmp_path):
    prof = tmp_path / "p.json"
    r = run_retool("loadtest", repo, "lin", "--budget-p99-ms", "500", "--concurrency", "1", "--window-ms", WINDOW, "--space", "small",
                   "--out", tmp_path / "lt", "--profile-out", prof, "--cost-per-hour", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "infer/s, p99" in r.stdout and "per million inferences" in r.stdout
    svg = (tmp_path / "lt" / "plot.svg").read_text()
    assert "chosen" in svg
    p = load_profile(prof)
    assert p.model == "lin" and p.measurement["p99_ms"] <= 500


def _lt_point(mode, load, throughput, p99, **extra):
    return {"mode": mode, "load": load, "throughput": throughput, "p50_ms": p99 / 3, "p90_ms": p99 / 2, "p99_ms": p99,
            "queue_ms": 0.1, "compute_ms": 0.2, "server_ms": 0.3, "stable": True, **extra}


def test_plot_svg_labels_points_draws_the_budget_and_spreads():
    """The loadtest picture (matplotlib's SVG backend): one curve per measured configuration, each point
    labelled with its concurrency or rate, the budget line, error bars only where a point has a spread."""
    from retool.serve import plot

    a = [_lt_point("concurrency", 1, 500.0, 2.0), _lt_point("concurrency", 4, 900.0, 3.1, p99_range_ms=[2.5, 4.0])]
    b = [_lt_point("rate", 100, 99.0, 1.5), _lt_point("rate", 400, 390.0, 2.5)]
    rep = {"model": "lin", "version": 3, "budget_p99_ms": 5.0, "configs": [
        {"label": "1 inst x 2 thr, no batching", "points": a, "best": a[1], "error": None},
        {"label": "2 inst x 1 thr, batching 100 us", "points": b, "best": b[1], "error": None},
        {"label": "broken", "points": [], "best": None, "error": "load failed"}],
        "chosen": {"label": "1 inst x 2 thr, no batching", "point": a[1]}}
    svg = plot.svg(rep)
    assert svg == plot.svg(rep) and svg.startswith("<svg") and "<dc:date>" not in svg  # same bytes every run
    assert len(re.findall(r'<g id="curve-\d+"', svg)) == 2 and 'id="chosen"' in svg
    for label in ("c1", "c4", "100/s", "400/s", "budget p99 5 ms", "lin v3: p99 latency vs throughput",
                  "1 inst x 2 thr, no batching", "throughput (inferences/s)", "client p99 (ms)"):
        assert f">{label}<" in svg, label
    # error bars (a LineCollection) only where the data has a spread: drop it and they go
    assert "LineCollection" in svg
    del a[1]["p99_range_ms"]
    assert "LineCollection" not in plot.svg(rep)
    assert plot.table_rows(rep)[0][0] == "1 inst x 2 thr, no batching" and plot.table_rows(rep)[1][-1] == "CHOSEN"
    assert plot.markdown(rep).splitlines()[0].startswith("| configuration | load | infer/s |")


def test_table_names_every_column_including_the_chosen_mark():
    """The ninth column (CHOSEN / best / error) has a header in the printed table too."""
    from retool import console
    from retool.serve import plot

    a = [_lt_point("concurrency", 1, 500.0, 2.0)]
    rep = {"model": "lin", "version": 1, "configs": [{"label": "1 inst", "points": a, "best": a[0], "error": None}],
           "chosen": {"label": "1 inst", "point": a[0]}}
    rows = plot.table_rows(rep)
    assert all(plot.HEADERS) and len(plot.HEADERS) == len(rows[0])
    header = console.table(plot.HEADERS, rows).splitlines()[0].split()
    assert header[-1] == "note" and rows[0][-1] == "CHOSEN"
