"""The readiness report's Serving section (validators/report_serving.py): Markdown, HTML, JSON, attach_serving,
and the page in headless Chromium."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fixtures import onnx_models
from fixtures.browser import chromium, needs_chromium
from retool.errors import UsageError
from retool.types import Report
from retool.validators.core import report_schema, validate
from retool.validators.report_serving import attach_serving, serving_html, serving_markdown


def _point(load, throughput, p99, mode="rate"):
    return {"mode": mode, "load": load, "throughput": throughput, "p50_ms": p99 / 4, "p90_ms": p99 / 2,
            "p99_ms": p99, "queue_ms": 0.1, "compute_ms": 0.3, "server_ms": 0.4, "stable": True}


def _plan(priced: bool = False) -> dict:
    """A plan in the shape `retool plan` writes (plan.json), two variants, one chosen."""
    cfg = {"instance_count": 1, "intra_op_thread_count": 2, "dynamic_batching": False,
           "max_queue_delay_microseconds": 0, "preferred_batch_size": []}
    plan = {
        "kind": "retool-serving-plan", "version": 1, "family": "fam-fp32",
        "inputs": {"budget_p99_ms": 4.0, "rate": 200.0, "price_per_hour": 0.4 if priced else None,
                   "currency": "EUR", "cores_per_replica": 2, "headroom": 0.7, "profile": "realtime"},
        "server": "local Triton 2.51", "machine": {},
        "candidates": [
            {"model": "fam-fp32", "version": 1, "variant": "cpu", "config": cfg, "label": "1 inst x 2 thr, no batching",
             "error": None, "sustainable_rate": {"value": 3472.0, "interval": [3472.0, 3857.0]}, "replicas": 1,
             "probe": [_point(1, 2135.0, 3.5, "concurrency")],
             "points": [_point(1000, 990.0, 1.9), _point(3471.5, 3406.4, 3.87)]},
            {"model": "fam-int8", "version": 1, "variant": "cpu-int8", "config": cfg,
             "label": "1 inst x 2 thr, no batching", "error": None, "sustainable_rate": None, "replicas": None,
             "probe": [_point(1, 122.0, 41.68, "concurrency")], "points": []},
        ],
        "chosen": {
            "model": "fam-fp32", "version": 1, "variant": "cpu", "precision": "fp32", "config": cfg,
            "label": "1 inst x 2 thr, no batching", "max_batch_size": 8,
            "sustainable_rate": {"value": 3472.0, "interval": [3472.0, 3857.0]},
            "replicas": 2, "replicas_range": [1, 2], "planned_rate_per_replica": 100.0,
            "confirmation": {"rate": 100.0, "runs": 3, "p50_ms": 0.994, "p99_ms": 3.233, "p99_range_ms": [2.438, 3.761],
                             "queue_ms": 0.142, "compute_ms": 0.554, "throughput": 101.0, "met": True},
            "p50_ms": 0.994, "p99_ms": 3.233, "queue_ms": 0.142, "compute_ms": 0.554,
            "resources": {"cpu": 2, "memory_bytes": 335544320, "model_bytes": 1637, "peak_rss_bytes": 191381504},
        },
        "runner_up": None,
        "rejected": [{"model": "fam-int8", "label": "fam-int8 v1: 1 inst x 2 thr, no batching",
                      "reason": "over budget by 37.68 ms at its lowest tried load"}],
        "ranking": [], "met": True, "rule": "cheapest (fewest replicas) first",
    }
    if priced:
        plan["chosen"].update({"cost_per_million": {"value": 1.111, "interval": [0.5556, 1.111]},
                               "cost_per_month": {"value": 584.0, "interval": [292.0, 584.0]}, "currency": "EUR"})
        plan["runner_up"] = {"model": "fam-fp32", "label": "fam-fp32 v1: 2 inst x 1 thr, no batching",
                             "why": "p99 at the planned rate worse beyond the noise (+0.8 ms)", "replicas": 2}
        plan["ranking"] = [dict(plan["runner_up"])]
    return plan


def test_markdown_section_unpriced():
    md = serving_markdown(_plan())
    assert md.startswith("### Serving: ✅ planned")
    assert "p99 <= 4 ms at 200 req/s (realtime)" in md
    assert "| chosen variant | fam-fp32 v1 (cpu, fp32) |" in md
    assert "1 inst x 2 thr, no batching: 1 instance(s); 2 intra-op thread(s); no dynamic batching" in md
    assert "| sustainable throughput per replica | 3472 req/s (range 3472–3857) |" in md
    assert "| replicas | 2 (range 1–2) |" in md
    assert "0.99 ms / 3.23 ms (p99 range 2.44–3.76 ms over 3 run(s) at 100 req/s per replica)" in md
    assert "| queue / compute | 0.14 ms / 0.55 ms on the server |" in md
    assert "not priced" in md and "EUR" not in md  # no price: no cost figures, no currency
    assert "rejected: over budget by 37.68 ms at its lowest tried load" in md
    assert "Runner-up" not in md


def test_markdown_section_priced_names_the_currency_and_the_runner_up():
    md = serving_markdown(_plan(priced=True))
    assert "| cost per 1M inferences | 1.111 EUR (range 0.5556–1.111) |" in md
    assert "| cost per month | 584 EUR (range 292–584) |" in md
    assert "0.4 EUR/h" in md
    assert ("**Runner-up:** fam-fp32 v1: 2 inst x 1 thr, no batching (2 replica(s)): p99 at the planned rate worse "
            "beyond the noise (+0.8 ms)") in md
    assert "1 other feasible" not in md  # the runner-up is not listed twice


def test_a_plan_that_meets_nothing_says_by_how_much():
    plan = _plan()
    plan.update(chosen=None, met=False, closest={"label": "fam-fp32 v1: 1 inst x 2 thr", "over_budget_ms": 1.234})
    md, html = serving_markdown(plan), serving_html(plan)
    assert "❌ nothing meets the budget" in md
    assert "nothing meets the budget; the closest, fam-fp32 v1: 1 inst x 2 thr, misses by 1.23 ms" in md
    assert "NO PLAN" in html and "misses by 1.23 ms" in html and "cards" not in html


def test_html_section_has_the_figures_and_the_candidates_plot():
    html = serving_html(_plan(priced=True))
    assert html.startswith('<section class="serving"><h2>Serving')
    assert "<b>1.111 EUR</b><span>cost per 1M inferences</span>" in html
    assert "<b>584 EUR</b><span>cost per month</span>" in html
    assert "<b>2</b><span>replicas</span>" in html and "<b>3.23 ms</b><span>p99 at the planned rate</span>" in html
    # one curve per candidate with measurements, the budget line, the confirmed choice with its p99 range
    assert 'class="plot loadtest"' in html and len(re.findall(r'<g id="curve-\d+"', html)) == 2
    assert "budget p99 4 ms" in html and 'id="chosen"' in html
    assert "over budget by 37.68 ms" in html


@pytest.fixture()
def validated(tmp_path):
    """A real `retool validate` report folder (fast: no latency)."""
    ref = onnx_models.linear(tmp_path / "ref.onnx")
    cand = onnx_models.linear(tmp_path / "cand.onnx")
    validate(cand, ref, batch_sizes=(1, 2), report_dir=tmp_path / "out")
    return tmp_path / "out"


def test_attach_serving_rewrites_the_three_reports(validated):
    before = json.loads((validated / "report.json").read_text())
    plan = _plan(priced=True)
    paths = attach_serving(validated / "report.json", plan)
    assert sorted(paths) == ["html", "json", "md"]
    data = json.loads((validated / "report.json").read_text())
    assert data["data"]["serving"] == plan  # JSON: the plan as it is, under data.serving
    assert {k: v for k, v in data["data"].items() if k != "serving"} == before["data"]
    assert data["passed"] == before["passed"] and data["checks"] == before["checks"]
    import jsonschema

    assert not list(jsonschema.Draft202012Validator(report_schema()).iter_errors(data))
    assert Report.load(validated / "report.json").data["serving"]["chosen"]["replicas"] == 2
    md = (validated / "report.md").read_text()
    assert "### Serving: ✅ planned" in md and "1.111 EUR" in md
    assert '<section class="serving">' in (validated / "report.html").read_text()
    assert not [p.name for p in validated.iterdir() if p.name.endswith(".tmp")]
    # attaching again replaces the section, it does not stack a second one
    attach_serving(validated, _plan())
    assert (validated / "report.md").read_text().count("### Serving") == 1
    assert "not priced" in (validated / "report.md").read_text()


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_attach_serving_refuses_bad_input_and_writes_nothing(validated, tmp_path):
    snap = _snapshot(validated)
    cases = [
        (tmp_path / "nowhere" / "report.json", _plan(), "no such file"),
        (validated / "report.md", _plan(), "not a report.json"),
        (validated / "report.json", {"kind": "something-else"}, "not a retool-serving-plan"),
    ]
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text(Report("convert", data={}).to_json())
    cases.append((other / "report.json", _plan(), "not of `retool validate`"))
    (other / "bad").mkdir()
    (other / "bad" / "report.json").write_text("{not json")
    cases.append((other / "bad" / "report.json", _plan(), "not a readable retool report"))
    for path, plan, words in cases:
        with pytest.raises(UsageError) as e:
            attach_serving(path, plan)
        msg = str(e.value)
        assert words in msg and "--report" in msg and "\n" not in msg and e.value.exit_code == 2, msg
    assert _snapshot(validated) == snap
    assert sorted(p.name for p in other.iterdir()) == ["bad", "report.json"]


def test_a_renderer_that_fails_leaves_the_old_reports_whole(validated):
    snap = _snapshot(validated)
    broken = _plan()
    broken["chosen"] = "not a mapping"  # a bug in the caller: the renderer raises
    with pytest.raises(AttributeError):
        attach_serving(validated / "report.json", broken)
    assert _snapshot(validated) == snap


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts: list[str] = []

    def handle_data(self, data):
        self.parts.append(data)


@needs_chromium
def test_serving_section_renders_in_headless_chromium(validated, tmp_path):
    attach_serving(validated / "report.json", _plan(priced=True))
    url = (validated / "report.html").resolve().as_uri()
    r = chromium("--dump-dom", url, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    section = dom[dom.index('<section class="serving">'):dom.index("</section>")]
    p = _Text()
    p.feed(section)
    text = " ".join(" ".join(p.parts).split())
    assert "fam-fp32 v1 (cpu) chosen variant" in text
    assert "2 replicas" in text and "2 (range 1–2)" in text
    assert "1.111 EUR cost per 1M inferences" in text and "584 EUR cost per month" in text
    assert "3.23 ms p99 at the planned rate" in text
    assert "over budget by 37.68 ms" in text
    assert section.count("<svg") == 1 and "budget p99 4 ms" in text  # the plot's text is text, not paths
