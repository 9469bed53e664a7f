"""retool plan: a real Triton and a real perf_analyzer measure a published family; the plan's figures
are checked against each other (replicas, cost), never against a timing."""
from __future__ import annotations

import json
import math

import pytest

from fixtures.proc import run_retool
from fixtures.serving_family import publish_family
from retool.publish import open_repo
from retool.serve.loadtest import LoadPoint
from retool.serve.plan import Candidate, PlanInputs, Variant, choose
from retool.serve.profile import ServingConfig

# budgets met or missed by real timings: run alone (make test's serial phase), not beside another worker
pytestmark = pytest.mark.serial

WINDOW = "400"  # ms: plumbing, not benchmarks


@pytest.fixture(scope="module")
def family_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    # the int8 variant computes a 1024-deep chain of 1024x1024 MatMuls: ~80 ms a row through Triton, and the
    # plan's samples send 8 rows a request (p99 0.82-0.93 s with one in flight); a 128-deep one met 50 ms
    publish_family(root / "repo", root / "models", slow_depth=1024)
    return root / "repo"


@pytest.fixture(scope="module")
def fast_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan-fast")
    # both variants about a millisecond: a budget nothing meets rejects each at its first probe
    publish_family(root / "repo", root / "models", slow_depth=4, slow_width=64)
    return root / "repo"


def _plan(repo, tmp_path, *args):
    out = tmp_path / "plan"
    r = run_retool("plan", repo, "fam-fp32", "--window-ms", WINDOW, "--out", out, *args, timeout=900)
    data = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else None
    return r, data, out


@pytest.mark.slow
def test_plan_on_two_variants_picks_the_one_that_meets_the_budget(family_repo, tmp_path):
    # 100 req/s and 50 ms: at 300 req/s perf_analyzer's Poisson load and Triton's python stub keep both cores
    # busy, and even at 100 the identity model's p99 reached 22-37 ms in scheduling stalls on a shared machine
    # (it failed at 15 ms); the slow variant needs about 0.8 s for one request, so the choice is never close
    r, plan, out = _plan(family_repo, tmp_path, "--budget-p99-ms", "50", "--rate", "100", "--price-per-hour", "0.4",
                         "--currency", "EUR", "--headroom", "0.5", "--apply")
    assert r.returncode == 0, r.stderr[-2000:]
    ch = plan["chosen"]
    assert ch["model"] == "fam-fp32" and ch["variant"] == "cpu"
    assert {v["model"] for v in plan["variants"]} == {"fam-fp32", "fam-int8"}
    rejected = [x for x in plan["rejected"] if x["model"] == "fam-int8"]
    assert rejected and all("over budget by" in x["reason"] for x in rejected)
    lo, hi = ch["sustainable_rate"]["interval"]
    assert 0 < lo <= hi
    assert ch["replicas"] == max(1, math.ceil(100 / (lo * 0.5)))
    assert ch["replicas_range"] == [max(1, math.ceil(100 / (hi * 0.5))), ch["replicas"]]
    cpm = ch["cost_per_million"]
    assert cpm["value"] == pytest.approx(0.4 * ch["replicas"] / (100 * 3600) * 1e6)
    assert cpm["interval"][0] <= cpm["value"] == cpm["interval"][1]
    assert ch["cost_per_month"]["value"] == pytest.approx(0.4 * ch["replicas"] * 730)
    assert ch["currency"] == "EUR" and "EUR" in (out / "plan.md").read_text()
    conf = ch["confirmation"]
    assert conf["runs"] == 3 and conf["outcome"] in ("pass", "undecided", "fail")
    assert conf["queue_ms"] >= 0 and conf["compute_ms"] > 0 and conf["p99_ms"] >= conf["p50_ms"] > 0
    assert ch["resources"]["cpu"] >= 1 and ch["resources"]["memory_bytes"] >= ch["resources"]["peak_rss_bytes"] > 0
    assert "serve fam-fp32 v1" in r.stdout and "EUR per million" in r.stdout
    # --apply: the chosen configuration is served, as a config revision that verify accepts
    repo = open_repo(family_repo)
    assert repo.serving_config("fam-fp32") == ServingConfig.from_dict(ch["config"])
    assert repo.versions("fam-fp32") == [1] and repo.verify()[0] == []


@pytest.mark.slow
def test_a_budget_nothing_meets_exits_6_with_the_miss(fast_family, tmp_path):
    r, plan, _ = _plan(fast_family, tmp_path, "--budget-p99-ms", "0.01", "--rate", "10")
    assert r.returncode == 6, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "no variant meets p99 <= 0.01 ms" in last and "misses by" in last and "Traceback" not in r.stderr
    assert plan["met"] is False and plan["chosen"] is None and plan["closest"]["over_budget_ms"] > 0


@pytest.mark.parametrize("override, what", [
    ({"--rate": "0"}, "--rate 0"), ({"--rate": "nan"}, "--rate nan"), ({"--rate": "-5"}, "--rate -5"),
    ({"--price-per-hour": "-1"}, "--price-per-hour -1"), ({"--cores-per-replica": "4096"}, "--cores-per-replica 4096"),
    ({"--headroom": "1.5"}, "--headroom 1.5"), ({"--budget-p99-ms": "inf"}, "--budget-p99-ms inf"),
])
def test_bad_plan_input_is_one_line_exit_2_and_writes_nothing(family_repo, tmp_path, cli, override, what):
    opts = {"--budget-p99-ms": "10", "--rate": "100", **override}
    r = cli("plan", family_repo, "fam-fp32", *[x for kv in opts.items() for x in kv], "--out", tmp_path / "p")
    assert r.code == 2, r.err
    flag, value = what.split(" ")
    assert flag in r.err and value in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_a_plan_for_a_model_that_is_not_published_exits_2(family_repo, tmp_path, cli):
    r = cli("plan", family_repo, "nope", "--budget-p99-ms", "10", "--rate", "100", "--out", tmp_path / "p")
    assert r.code == 2 and "no model named 'nope'" in r.err
    assert not (tmp_path / "p").exists()


# ---- the choice, on synthetic measurements (no timing involved) --------------------------------------------------
def _variant(name, precision="fp32", published=ServingConfig(1, None, True, 100)):
    return Variant(name, 1, "cpu" if precision == "fp32" else "cpu-int8", precision, name * 8, 1000, 8, published, True)


def _pt(p99, rate=100.0, stable=True):
    return LoadPoint("rate", rate, rate, p99 / 2, p99 * 0.8, p99, 0.1, p99 / 3, p99 / 3 + 0.1, stable)


def _cand(v, cfg, bracket, p99=None):
    c = Candidate(v, cfg, sustainable=bracket, cores=2)
    c.at_planned = _pt(p99) if p99 is not None else None
    return c


def test_ties_within_noise_keep_the_published_configuration_and_higher_precision():
    fp32, int8 = _variant("a"), _variant("b", "int8")
    pub = fp32.published
    other = ServingConfig(1, 2, False)
    inp = PlanInputs(10.0, 100.0, profile="throughput", cores_per_replica=2)
    # brackets overlap: tied. The published config of the fp32 variant stays first, whatever order they come in
    cands = [_cand(int8, pub, (500, 600)), _cand(fp32, other, (520, 610)), _cand(fp32, pub, (480, 590))]
    ranked, notes = choose(cands, inp)
    assert ranked[0].variant is fp32 and ranked[0].config == pub
    assert all("tied within noise" in n["why"] for n in notes)
    # a clear win beyond the noise moves ahead
    cands.append(_cand(int8, other, (2000, 2400)))
    ranked, _ = choose(cands, inp)
    assert ranked[0].variant is int8 and ranked[0].config == other


def test_realtime_takes_the_lowest_p99_beyond_the_noise_even_at_more_replicas():
    v = _variant("a")
    cheap = _cand(v, v.published, (300, 350), p99=9.0)  # 1 replica at rate 100 / 0.7
    fast = _cand(v, ServingConfig(1, 2, False), (120, 140), p99=2.0)  # 2 replicas, p99 far lower
    inp = PlanInputs(10.0, 100.0, profile="realtime", cores_per_replica=2)
    ranked, notes = choose([cheap, fast], inp)
    assert ranked[0] is fast and "worse beyond the noise" in notes[0]["why"]
    # the same two under the throughput profile: the cheaper deployment wins
    ranked, notes = choose([cheap, fast], PlanInputs(10.0, 100.0, profile="throughput", cores_per_replica=2))
    assert ranked[0] is cheap and "needs 2 replicas against 1" in notes[0]["why"]
    # within the stability bound of the windows, realtime keeps the cheaper one
    close = _cand(v, ServingConfig(1, 2, False), (120, 140), p99=8.0)
    ranked, notes = choose([cheap, close], inp)
    assert ranked[0] is cheap and "tied within noise" in notes[0]["why"]


def test_a_poisson_shortfall_within_its_noise_is_not_falling_behind():
    from retool.serve.choice import keeps_up, rate_window_ms

    assert rate_window_ms(10, 400) == 5000 and rate_window_ms(1000, 400) == 400 and rate_window_ms(0.1, 400) == 10000
    # 10 req/s over 3 x 5 s windows: 150 requests, sd ~12: 86 % of the rate is noise, 50 % is falling behind
    assert keeps_up(_pt(1.0, rate=8.6), 10, 5000) and not keeps_up(_pt(1.0, rate=5.0), 10, 5000)
    # at 2000 req/s the count is precise: 5 % short is the most that passes
    assert keeps_up(_pt(1.0, rate=1920), 2000, 400) and not keeps_up(_pt(1.0, rate=1850), 2000, 400)
