"""The one decision rule (retool.speed.decide*): synthetic timing series only, no real timing."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from retool import speed


def series(center: float, spread: float, n: int, seed: int) -> list[float]:
    return list(np.random.default_rng(seed).normal(center, spread, n).clip(min=1e-3))


def test_a_clear_speedup_passes_with_its_interval_and_rule():
    d = speed.decide_ratio(series(2.0, 0.1, 60, 1), series(1.0, 0.05, 60, 2), 1.2)
    assert d.outcome == speed.PASS and d.passed
    assert d.interval[0] >= 1.2 and d.interval[0] <= d.estimate <= d.interval[1]
    assert d.rule == "95% paired bootstrap CI of the median ratio, 2000 resamples" and d.samples == 60
    assert d.text.startswith(f"{d.estimate:.2f}× (95% CI ") and d.text.endswith(">= 1.2×: pass")
    blob = json.loads(json.dumps(d.to_dict()))
    assert blob["outcome"] == "pass" and len(blob["interval"]) == 2 and blob["rule"] == d.rule


def test_a_clear_slowdown_fails():
    d = speed.decide_ratio(series(1.0, 0.05, 60, 1), series(2.0, 0.1, 60, 2), 1.0)
    assert d.outcome == speed.FAIL and d.interval[1] < 1.0


def test_an_interval_straddling_the_threshold_is_undecided_not_pass():
    # a median ratio of about 1.25 above a 1.2 gate, but the rounds are too noisy to say so
    ref = series(1.25, 0.6, 12, 3)
    d = speed.decide_ratio(ref, series(1.0, 0.5, 12, 4), 1.2)
    assert d.outcome == speed.UNDECIDED and not d.passed
    assert d.interval[0] < 1.2 < d.interval[1]
    assert speed.resolve(d, "fail").outcome == "fail" and "undecided" in speed.resolve(d, "fail").note
    assert speed.resolve(d, "pass").outcome == "pass"


def test_lower_is_better_for_latency_budgets():
    fast = series(10.0, 0.5, 200, 5)
    assert speed.decide_sample(fast, 20.0, stat="p99").outcome == speed.PASS
    assert speed.decide_sample(fast, 5.0, stat="p99").outcome == speed.FAIL
    est, lo, hi = speed.sample_interval(fast, stat="p99")
    assert lo <= est <= hi and speed.decide_sample(fast, est, stat="p99").outcome == speed.UNDECIDED


def test_the_same_samples_give_the_same_answer():
    a, b = series(1.1, 0.3, 40, 6), series(1.0, 0.3, 40, 7)
    assert speed.paired_ratio_interval(a, b) == speed.paired_ratio_interval(a, b)
    assert speed.paired_ratio_interval(a, b, seed=1) != speed.paired_ratio_interval(a, b)


def test_too_few_rounds_give_no_interval_and_stay_undecided():
    est, lo, hi = speed.paired_ratio_interval([10.0, 10.0], [1.0, 1.0])
    assert est == 10.0 and lo == 0.0 and math.isinf(hi)
    d = speed.decide(est, lo, hi, 1.2)
    assert d.outcome == speed.UNDECIDED and "no 95% CI" in d.text


def test_more_samples_resolve_an_undecided_comparison():
    rng = np.random.default_rng(8)

    def rounds(n):  # the candidate is truly 1.3x faster; each round is noisy
        c = rng.normal(1.0, 0.35, n).clip(min=0.05)
        return list(c * 1.3 * rng.normal(1.0, 0.25, n).clip(min=0.05)), list(c)

    first = rounds(6)
    assert speed.decide_ratio(*first, 1.1).outcome == speed.UNDECIDED
    calls = []
    t = [0.0]

    def more():
        calls.append(1)
        t[0] += 1.0  # a fake clock: one "second" per batch of rounds
        return rounds(20)

    d = speed.decide_until(more, first, 1.1, time_budget_s=30, clock=lambda: t[0])
    assert d.outcome == speed.PASS and calls and d.samples > 6 and d.extra_s > 0 and not d.note


def test_a_budget_that_runs_out_leaves_it_undecided_and_says_so():
    t = [0.0]

    def more():  # truly equal: no amount of measuring puts the interval above 1.0
        t[0] += 1.0
        return [1.0, 1.1, 0.9], [1.1, 0.9, 1.0]

    d = speed.decide_until(more, ([1.0, 1.2, 0.8, 1.0], [1.0, 0.9, 1.1, 1.0]), 1.0 + 1e-9,
                           time_budget_s=3, clock=lambda: t[0])
    assert d.outcome == speed.UNDECIDED and "still undecided" in d.note and d.extra_s == 3
    zero = speed.decide_until(more, ([1.0, 1.2, 0.8, 1.0], [1.0, 0.9, 1.1, 1.0]), 1.0 + 1e-9, time_budget_s=0)
    assert zero.outcome == speed.UNDECIDED and zero.extra_s == 0 and "no time budget" in zero.note


def test_ties_within_the_noise_keep_the_higher_precision():
    fp32 = series(0.504, 0.06, 40, 9)
    ch = speed.choose_fastest({"cpu": fp32, "int8": series(0.500, 0.06, 40, 10),
                               "int8-w": series(0.51, 0.06, 40, 11)}, ["cpu", "int8", "int8-w"])
    assert ch.name == "cpu" and set(ch.tied) == {"int8", "int8-w"}
    assert "higher precision" in ch.reason and "tied within the noise" in ch.reason
    fast = speed.choose_fastest({"cpu": fp32, "int8": [x / 1.8 for x in fp32]}, ["cpu", "int8"])
    assert fast.name == "int8" and "decidedly faster" in fast.reason and fast.decisions["int8"].passed


def _noisy_latency(ref_center: float, n: int = 12) -> dict:
    """A validate report's latency block at batch 1 whose paired samples straddle a 1.2x gate."""
    ref, cand = series(ref_center, 0.6, n, 3), series(1.0, 0.5, n, 4)
    from retool.validators.latency import summarize

    return {"candidate": {"1": summarize(cand, 1)}, "reference": {"1": summarize(ref, 1)}, "speedup": {},
            "speedup_stats": {"1": speed.paired(ref, cand)}}


def test_a_min_speedup_gate_over_a_straddling_interval_is_undecided_and_not_pass():
    from retool.validators.gates import Gates, gate_checks

    lat = _noisy_latency(1.25)
    [c] = gate_checks(Gates(min_speedup=1.2), size_mb=1.0, latency=lat)
    assert c.name == "speedup@batch1" and not c.passed and c.details["outcome"] == "undecided"
    assert c.details["decision"]["outcome"] == "fail" and "--min-speedup counts it as fail" in c.message
    assert "95% CI" in c.message and c.details["decision"]["rule"].startswith("95% paired bootstrap")
    [ok] = gate_checks(Gates(min_speedup=1.2, undecided="pass"), size_mb=1.0, latency=lat)
    assert ok.passed and ok.details["outcome"] == "undecided"


def test_not_slower_passes_an_undecided_tie_and_fails_a_clear_slowdown():
    from retool.validators.gates import Gates
    from retool.validators.speed_gate import not_slower_checks

    [tie] = not_slower_checks(Gates(), "int8", _noisy_latency(1.0))
    assert tie.passed and tie.details["outcome"] == "undecided" and "counts it as pass" in tie.message
    [strict] = not_slower_checks(Gates(undecided={"not_slower": "fail"}), "int8", _noisy_latency(1.0))
    assert not strict.passed
    [slow] = not_slower_checks(Gates(), "int8", _noisy_latency(0.3, n=40))
    assert not slow.passed and slow.details["outcome"] == "fail" and "slower" in slow.message


def test_undecided_gates_measure_more_within_the_budget_then_stop():
    from retool.validators import decide_gates as dg
    from retool.validators.gates import Gates

    t = [0.0]

    def tick():
        t[0] += 0.01
        return t[0]

    samples = {"candidate": [1.0, 1.5, 0.6, 1.2], "reference": [1.1, 1.0, 1.4, 0.7]}
    variants = {"candidate": lambda: None, "reference": lambda: None}
    ds, extra = dg.measure_until_decided(1, samples, variants, Gates(min_speedup=1.5), False, 0.0, clock=tick)
    d = ds["speedup@batch1"]
    assert d.undecided and extra == 0 and len(samples["candidate"]) == 4 and "no time budget" in d.note
    ds, extra = dg.measure_until_decided(1, samples, variants, Gates(min_speedup=1.5), False, 0.015, clock=tick)
    d = ds["speedup@batch1"]  # judged again on the longer series (its outcome is the no-ops' timing: not asserted)
    assert len(samples["candidate"]) > 4 and d.samples == len(samples["candidate"]) and extra > 0


def test_gate_yaml_takes_undecided_and_its_budget():
    from retool.errors import UsageError
    from retool.validators.gates import load_gates

    g = load_gates({"min_speedup": 1.2, "undecided": {"min_speedup": "pass"}, "decide_budget_s": 3})
    assert g.undecided == {"min_speedup": "pass"} and g.decide_budget_s == 3.0
    with pytest.raises(UsageError, match="undecided must be pass or fail"):
        load_gates({"undecided": "maybe"})


def test_identical_variants_get_intervals_that_contain_1_at_least_nine_times_in_ten():
    """Interval honesty on synthetic series: shared per-round load, own noise, 5 % stalls."""
    rng = np.random.default_rng(42)
    hits, trials = 0, 100
    for t in range(trials):
        load = rng.lognormal(0, 0.3, 30)

        def one():
            return load * rng.lognormal(0, 0.2, 30) * (1 + (rng.random(30) < 0.05) * rng.exponential(3, 30))

        _, lo, hi = speed.paired_ratio_interval(one(), one(), resamples=500, seed=t)
        hits += lo <= 1.0 <= hi
    assert hits >= 90, hits


def test_the_cli_takes_undecided_and_decide_budget_into_the_gates(cli, tmp_path):
    from fixtures.onnx_tiny import linear

    model = linear(tmp_path / "m.onnx")
    r = cli("validate", model, "--undecided", "fail", "--decide-budget", "0", "--json")
    assert r.code == 0, r.err
    cfg = json.loads(r.out)["data"]["gate_config"]
    assert cfg["undecided"] == "fail" and cfg["decide_budget_s"] == 0
    bad = cli("validate", model, "--undecided", "maybe")
    assert bad.code == 2 and "--undecided" in bad.err


def test_decoder_speedups_go_through_the_one_rule():
    import numpy as np

    from retool.validators.decode_latency import _paired

    rng = np.random.default_rng(3)
    ref = list(1.0 + 0.1 * rng.standard_normal(200))
    fast = _paired(ref, list(0.5 + 0.05 * rng.standard_normal(200)))
    assert fast["measurable"] and fast["verdict"] == "faster" and fast["interval"][0] > 1.0
    same = _paired(ref, list(ref))
    assert not same["measurable"] and same["verdict"] == "none"
