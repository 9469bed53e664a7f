"""The serving choices judged on intervals (retool.serve.choice): synthetic load points, no timing."""
from __future__ import annotations

import itertools

from retool.serve import choice
from retool.serve.loadtest import LoadPoint, LoadSpec
from retool.serve.profile import ServingConfig
from retool.serve.tune import Measured, pick


def _pt(p99, load=1.0, thr=100.0, mode="concurrency", stable=True):
    return LoadPoint(mode, load, thr, p99 / 2, p99 * 0.8, p99, 0.1, p99 / 3, p99 / 3 + 0.1, stable)


def _again(p99s):
    it = iter(p99s)
    calls = []

    def again():
        calls.append(1)
        return _pt(next(it))
    return again, calls


def test_a_point_clearly_under_or_over_the_budget_is_decided_without_measuring_again():
    again, calls = _again(itertools.repeat(1.0))
    d, _, more = choice.judge(_pt(10.0), 20.0, again)
    assert d.passed and d.interval[1] <= 20.0 and not calls and not more
    d, _, _ = choice.judge(_pt(30.0), 20.0, again)
    assert d.outcome == "fail" and not calls


def test_a_point_within_the_noise_of_the_budget_is_measured_again_and_then_decided():
    again, calls = _again([18.0, 18.2])  # 18 ms * 1.25 straddles 20: undecided on one run
    d, rep, more = choice.judge(_pt(18.1), 20.0, again)
    assert len(calls) == choice.REMEASURE and d.passed and d.samples == 3 and len(more) == 2
    assert rep.p99_ms == 18.1  # the median run stands for the three


def test_still_undecided_is_planned_as_a_miss_and_says_so():
    again, calls = _again([14.0, 23.0])
    d, _, _ = choice.judge(_pt(19.0), 20.0, again)
    assert d.undecided and not d.passed and "safe side" in d.note and len(calls) == 2


def test_an_unstable_point_has_a_wider_band():
    assert choice.meets([_pt(15.0)], 20.0).passed
    assert choice.meets([_pt(15.0, stable=False)], 20.0).undecided


def test_the_sweep_stops_only_beyond_the_noise():
    assert not choice.over_budget(_pt(22.0), 20.0)  # within the band: more load may still be measured
    assert choice.over_budget(_pt(26.0), 20.0)
    assert not choice.over_budget(_pt(1e6), None)


def test_the_budget_search_keeps_the_fastest_point_that_meets_the_budget_beyond_the_noise():
    m = Measured(ServingConfig(1, 1, False))
    m.points = [_pt(5.0, 1, thr=100.0), _pt(12.0, 2, thr=180.0), _pt(19.0, 4, thr=200.0)]
    pick(m, LoadSpec(budget_p99_ms=20.0))  # no re-measuring: the 19 ms point stays undecided
    assert m.best.throughput == 180.0 and m.decision.passed
    assert len(m.undecided) == 1 and m.undecided[0].estimate == 19.0
    # measured again, the 19 ms point's runs are decided under the budget: it is kept
    m.undecided = []
    pick(m, LoadSpec(budget_p99_ms=20.0), again=lambda p: _pt(17.0, p.load, thr=p.throughput))
    assert m.best.throughput == 200.0 and m.decision.samples == 3
    assert len(m.points) == 5 and m.best in m.points  # the two runs measured again are kept and shown


def test_without_a_budget_the_fastest_point_is_kept_and_at_a_rate_the_lowest_p99_that_keeps_up():
    m = Measured(ServingConfig(1, 1, False))
    m.points = [_pt(5.0, thr=100.0), _pt(50.0, thr=300.0)]
    pick(m, LoadSpec())
    assert m.best.throughput == 300.0 and m.decision is None
    m.points = [_pt(3.0, 50, thr=20.0, mode="rate"), _pt(4.0, 50, thr=50.0, mode="rate")]
    pick(m, LoadSpec(rate=50.0, window_ms=1000))
    assert m.best.p99_ms == 4.0  # the 3 ms point fell behind the offered rate


def test_the_spec_is_frozen_and_recorded():
    import dataclasses

    import pytest

    s = LoadSpec(budget_p99_ms=20.0, rate=50.0, price_per_hour=2.0, currency="EUR")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.budget_p99_ms = 30.0  # type: ignore[misc]
    assert s.sweep_rates() == [50.0] and s.to_dict()["currency"] == "EUR"
    assert LoadSpec(rates=(10.0, 20.0)).sweep_rates() == [10.0, 20.0]


def test_the_published_configuration_stays_unless_beaten_beyond_the_noise():
    pub, other = Measured(ServingConfig(1, None, True, 100)), Measured(ServingConfig(2, 1, False))
    pub.best, other.best = _pt(5.0, thr=100.0), _pt(5.0, thr=120.0)  # 1.2x: inside two 25 % bands
    chosen, d, challenger = choice.configuration([pub, other], pub, "throughput")
    assert chosen is pub and d.undecided and challenger is other
    other.best = _pt(5.0, thr=200.0)  # 2x: beyond the noise
    chosen, d, _ = choice.configuration([pub, other], pub, "throughput")
    assert chosen is other and d.passed
    assert choice.configuration([pub, other], None, "throughput")[0] is other  # nothing published: the best
    pub.best = None  # the published configuration met nothing
    assert choice.configuration([pub, other], pub, "throughput")[:2] == (other, None)
    # at a fixed rate the lowest p99 decides
    pub.best, other.best = _pt(10.0), _pt(4.0)
    chosen, d, _ = choice.configuration([pub, other], pub, "p99_ms")
    assert chosen is other and d.passed


def test_a_challenger_that_won_one_unpaired_measurement_must_win_alternating_rounds_too():
    """Two configurations measured minutes apart: a load that changed in between can fake a win."""
    pub, other = Measured(ServingConfig(1, 1, True, 100)), Measured(ServingConfig(1, 2, True, 500))
    pub.best, other.best = _pt(10.0), _pt(4.0)  # beyond the bands when measured one after the other
    asked = []

    def confirm_with(pub_p99s, ch_p99s):
        def confirm(challenger, published):
            asked.append((challenger, published))
            return choice.confirmed([_pt(x) for x in pub_p99s], [_pt(x) for x in ch_p99s], "p99_ms")
        return confirm

    # back to back, the two are alike: the published configuration stays, and the decision says so
    chosen, d, challenger = choice.configuration([pub, other], pub, "p99_ms", confirm_with([5.0, 4.0, 6.0],
                                                                                          [5.5, 4.5, 5.0]))
    assert chosen is pub and not d.passed and challenger is other and asked == [(other, pub)]
    assert "paired rounds" in d.rule and d.samples == 3
    # the challenger wins every round: it replaces the published configuration
    chosen, d, _ = choice.configuration([pub, other], pub, "p99_ms", confirm_with([10.0, 9.0, 11.0],
                                                                                  [4.0, 4.2, 3.9]))
    assert chosen is other and d.passed and d.interval[0] > 1.0
    # by throughput: higher is better for the challenger
    d = choice.confirmed([_pt(5.0, thr=100.0)] * 3, [_pt(5.0, thr=x) for x in (150.0, 160.0, 155.0)], "throughput")
    assert d.passed and 1.4 < d.estimate < 1.7
    # no win in the unpaired comparison: nothing is re-measured
    asked.clear()
    pub.best, other.best = _pt(5.0), _pt(4.9)
    choice.configuration([pub, other], pub, "p99_ms", confirm_with([1.0] * 3, [1.0] * 3))
    assert not asked
