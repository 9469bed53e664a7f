"""One speed-up quantity and its wording, timing for a duration, the paired spread, the default
not-slower gate for quantized models, the worst batch in the summary, outlier-proof plots.

Timings are never asserted: the slow fixture is slower by construction (tens of times).
"""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from fixtures import onnx_speed
from retool import speed
from retool.validators.core import validate

LOOSE = {"parity": {"*": {"atol": None, "rtol": None, "min_cosine": 0.99}}}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("speed")
    return {"fast": onnx_speed.identity(d / "fast.onnx"), "slow": onnx_speed.slow_int8(d / "slow.onnx")}


def test_one_wording_for_faster_slower_and_inside_the_noise():
    assert speed.format_speedup(1.32, [1.28, 1.36]) == "1.32× faster (IQR 1.28–1.36)"
    assert speed.format_speedup(0.75, [0.72, 0.78]) == "0.75× (slower; IQR 0.72–0.78)"
    # a ratio whose paired IQR straddles 1 is no difference, whatever its median says
    assert speed.format_speedup(1.10, [0.93, 1.25]).startswith("no measurable difference (1.10×")
    assert speed.verdict(1.01, [1.005, 1.015]) == "none"  # under the 2 % floor
    assert speed.format_speedup(1.5, None, spread=False) == "1.50× faster"


def test_paired_ratios_give_the_spread():
    s = speed.paired([2.0, 2.2, 1.8, 2.0], [1.0, 1.1, 0.9, 1.0])
    assert s["speedup"] == pytest.approx(2.0) and s["iqr"] == [2.0, 2.0] and s["verdict"] == "faster"
    noisy = speed.paired([1.0, 1.3, 0.8, 1.1, 0.9], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert noisy["verdict"] == "none" and "no measurable difference" in noisy["text"]


def test_a_count_alone_is_timed_for_a_minimum_duration_too():
    import time

    from retool.validators.latency import MIN_TIME_S, Plan, measure_interleaved

    plan = Plan.make(runs=3)
    assert plan.time_budget_s == MIN_TIME_S and plan.min_runs == 3
    t0 = time.perf_counter()
    samples = measure_interleaved({"a": lambda: time.sleep(0.002)}, Plan.make(runs=3, time_budget_s=0.05))
    assert time.perf_counter() - t0 >= 0.05 and len(samples["a"]) > 3
    exact = measure_interleaved({"a": lambda: None}, Plan.make(runs=3, time_budget_s=0))
    assert len(exact["a"]) == 3


def test_quantized_candidate_slower_than_its_reference_fails_by_default(pair, cli, tmp_path):
    r = validate(pair["slow"], pair["fast"], batch_sizes=(1, 2), latency=True, threads=1, runs=5,
                 time_budget_s=0.1, gates=LOOSE)
    assert r.data["candidate"]["precision"] == "int8"
    assert {c.name for c in r.failed_checks} == {"not-slower@batch1", "not-slower@batch2"}
    st = r.data["latency"]["speedup_stats"]["2"]
    assert st["verdict"] == "slower" and st["iqr"][1] < 1 and st["speedup"] == r.data["latency"]["speedup"]["2"]
    # switched off explicitly: passes, and the report says the gate was off
    off = validate(pair["slow"], pair["fast"], latency=True, threads=1, runs=5, time_budget_s=0.1,
                   gates={**LOOSE, "not_slower": False})
    assert off.passed and any("switched off" in w for w in off.warnings)
    assert off.data["gate_config"]["not_slower"] is False
    # the CLI: exit 6 by default, 0 with --allow-slower; the table says "(slower"
    g = tmp_path / "g.yaml"
    g.write_text(json.dumps(LOOSE))
    args = ("validate", pair["slow"], "--reference", pair["fast"], "--runs", "5", "--time-budget", "0.1",
            "--threads", "1", "--gates", g)
    r = cli(*args)
    assert r.code == 6 and "(slower" in r.out and "not-slower@batch1" in r.err
    r = cli(*args, "--allow-slower")
    assert r.code == 0 and "switched off" in r.err


def test_an_fp32_candidate_is_not_gated_on_speed_unless_asked(pair):
    r = validate(pair["fast"], pair["slow"], latency=True, threads=1, runs=5, time_budget_s=0.1, gates=LOOSE)
    assert not any(c.name.startswith("not-slower") for c in r.checks)
    assert r.data["latency"]["speedup_stats"]["1"]["verdict"] == "faster"
    on = validate(pair["fast"], pair["slow"], latency=True, threads=1, runs=5, time_budget_s=0.1,
                  gates={**LOOSE, "not_slower": True})
    assert [c.passed for c in on.checks if c.name.startswith("not-slower")] == [True]


def test_validate_without_reference_says_what_was_not_checked(pair, cli):
    r = cli("validate", pair["fast"])
    assert r.code == 0
    assert "NOT checked: parity against a reference" in r.out and "latency" in r.out.split("NOT checked:")[1]
    from retool.validators.report_html import render_html
    from retool.validators.report_md import render_markdown

    rep = validate(pair["fast"])
    assert "**Not checked:** parity against a reference" in render_markdown(rep)
    assert "Not checked:</b> parity against a reference" in render_html(rep)


def test_summary_shows_the_worst_batch_not_batch_1():
    from retool.pipeline.jobs import _summary_numbers
    from retool.pipeline.runner import TargetOutcome
    from retool.pipeline.summary import render_summary

    lat = {"candidate": {"1": {"p50_ms": 1.0, "p99_ms": 2.0}, "8": {"p50_ms": 9.0, "p99_ms": 12.0}},
           "speedup": {"1": 1.3, "8": 0.54},
           "speedup_stats": {"1": speed.stats(1.3, [1.25, 1.35], 100), "8": speed.stats(0.54, [0.5, 0.6], 100)}}
    nums = _summary_numbers(SimpleNamespace(data={"latency": lat, "size_mb": 1.0}))
    assert nums["batch"] == 8 and nums["p50_ms"] == 9.0 and nums["speedup"] == 0.54
    md = render_summary([object()], {}, [TargetOutcome("m", "cpu-int8", "ok", stages={"validate": {"summary": nums}})],
                        0, 1.0)
    assert "| 8 (worst of 2) |" in md and "0.54× (slower; IQR 0.50–0.60)" in md


def test_html_latency_axis_survives_an_outlier_and_one_batch_draws_no_curve(pair, tmp_path):
    from retool.validators.report_html import latency_axis_max, latency_svg, render_html, throughput_svg

    samples = [0.07] * 99 + [8.75]
    stats = {"candidate": {"p50_ms": 0.07, "p99_ms": 0.7, "samples_ms": samples}}
    hi = latency_axis_max(stats)
    assert hi < 1.0  # the 8.75 ms run does not set the axis
    svg = latency_svg("1", stats)
    assert svg.count('class="clipped"') == 2 and "1 slower run(s)" in svg  # the mark and its label
    one = {"candidate": {"1": {"throughput_per_s": 10.0}}}
    drawn = re.search(r'<g id="items-candidate">(.*?)</g>', throughput_svg(one), re.S).group(1)
    assert "<use" in drawn and "\nL " not in drawn  # the point, and no line segment
    r = validate(pair["fast"], pair["fast"], latency=True, threads=1, runs=5, time_budget_s=0.05)
    page = render_html(r)
    assert "plot latency" in page and "plot throughput" not in page
    assert "speed-up at batch 1" in page and "no measurable difference" in page


def test_summary_counts_serving_time_and_prints_the_gate_decision():
    from retool.pipeline.runner import TargetOutcome
    from retool.pipeline.summary import render_summary

    d = speed.resolve(speed.decide(0.29, 0.21, 0.4, 1 / 1.02), "pass").to_dict()
    nums = {"batch": 1, "p50_ms": 1.0, "decision": {**d, "gate": "not-slower", "raw_outcome": "fail"},
            "machine_busy": True}
    o = TargetOutcome("caffe-net", "cpu-int8", "failed", 6, "gate failed: not-slower@batch1",
                      stages={"validate": {"summary": nums}, "serve": {"seconds": 220.5}})
    md = render_summary([object()], {}, [o], 6, 227.0)
    assert "227.0 s (serving 220.5 s)" in md
    assert "0.29× (slower; 95% CI 0.21–0.40): not-slower fail" in md  # the words the demo's footer prints too
    assert "Timed on a busy machine" in md and "caffe-net/cpu-int8" in md
