"""bench's `decisions` section: the CPU hog's lifecycle, and its counting on synthetic data (no timing asserted)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench import sec_decisions as sd

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


def _gone(pids, within_s=10.0) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_the_hog_runs_inside_its_block_and_is_killed_after_it_even_on_an_exception():
    with pytest.raises(RuntimeError):
        with sd.cpu_hog(1, settle_s=0) as procs:
            assert procs and all(p.poll() is None for p in procs)
            pids = [p.pid for p in procs]
            raise RuntimeError("the scenario failed")
    assert all(p.poll() is not None for p in procs)
    assert _gone(pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_the_hog_cannot_outlive_a_bench_that_dies_without_cleaning_up():
    code = ("import os, sys; from bench import sec_decisions as sd\n"
            "procs = sd.start_hog(1)\nprint(' '.join(str(p.pid) for p in procs), flush=True)\nos._exit(0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    pids = [int(x) for x in r.stdout.split()]
    assert pids
    assert _gone(pids), f"hog {pids} outlived its parent"


def test_hog_command_is_stress_ng_or_one_busy_loop_per_core():
    cmds, what = sd.hog_command(3)
    assert ("stress-ng --cpu 3" == what and len(cmds) == 1) or (what == "python busy loop x 3" and len(cmds) == 3)


def test_identical_series_give_intervals_around_one_and_a_real_difference_does_not():
    rng = np.random.default_rng(0)
    base = rng.lognormal(0.0, 0.2, 200)
    same = [sd.pair_interval(base * rng.lognormal(0, 0.05, 200), base * rng.lognormal(0, 0.05, 200))
            for _ in range(5)]
    assert all(i["contains_1"] and i["lo"] <= 1.0 <= i["hi"] for i in same)
    slower = sd.pair_interval(base, 2.0 * base * rng.lognormal(0, 0.05, 200))
    assert not slower["contains_1"] and slower["hi"] < 1.0
    few = sd.pair_interval([1.0, 1.1], [1.0, 1.2])  # under MIN_ROUNDS: no interval, so it contains 1
    assert few["contains_1"] and few["hi"] is None


def test_honesty_counts_the_pairs_the_rule_calls_the_same_against_the_goal():
    iv = [sd.pair_interval([1.0] * 20, [1.0] * 20)] * 19 + [sd.pair_interval([1.0] * 20, [1.1] * 20)]
    h = sd.honesty(iv)
    assert (h["pairs"], h["rule_says_same"], h["fraction"], h["meets_goal"]) == (20, 19, 0.95, True)
    h = sd.honesty(iv[1:] + [iv[-1]])
    assert (h["rule_says_same"], h["meets_goal"]) == (18, False)
    # 0.5 % apart, steadily: the interval misses 1.0, yet the rule calls them the same (the noise floor)
    rng = np.random.default_rng(1)
    base = rng.lognormal(0.0, 0.01, 400)
    close = sd.pair_interval(base, 1.005 * base * rng.lognormal(0, 0.002, 400))
    assert not close["contains_1"] and close["rule_says_same"]
    h = sd.honesty([close] * 20)
    assert h["meets_goal"] and h["contain_1"] == 0 and h["fraction_contain_1"] == 0.0
    assert sd.honesty([])["fraction"] is None


def _t(published=True, undecided=False, serving="a", serving_undecided=False, extra=(0.0,), threads=1,
       threads_undecided=False):
    return {"published": published, "undecided": undecided, "gates": {}, "extra_timing_s": list(extra),
            "serving": serving, "serving_label": serving, "serving_kept": False,
            "serving_undecided": serving_undecided, "threads": threads, "threads_undecided": threads_undecided,
            "threads_why": f"{threads} thread(s)"}


def test_a_change_is_a_flip_unless_either_run_reported_it_undecided():
    runs = [{"phase": "quiet", "targets": {"m/cpu": _t(), "m/cpu-int8": _t()}},
            {"phase": "loaded", "targets": {"m/cpu": _t(), "m/cpu-int8": _t(published=False, undecided=True)}},
            {"phase": "quiet", "targets": {"m/cpu": _t(serving="b"), "m/cpu-int8": _t(serving="c",
                                                                                      serving_undecided=True)}},
            # a thread count the sweep could not decide changes the serving default: both reported;
            # a decided thread-count change is a flip
            {"phase": "loaded", "targets": {"m/cpu": _t(threads=2, threads_undecided=True, serving="d"),
                                            "m/cpu-int8": _t(threads=2)}}]
    f = sd.flips(runs)
    assert (f["flips"], f["reported"], f["compared"], f["threads_changed"]) == (1, 3, 12, 2)
    flip = [d for d in f["details"] if d["kind"] == "FLIP"]
    assert flip == [{"run": 2, "phase": "quiet", "target": "m/cpu", "aspect": "serving", "first": "a", "this": "b",
                     "kind": "FLIP"}]
    assert {(d["target"], d["aspect"], d["kind"]) for d in f["details"] if d["run"] == 3} == {
        ("m/cpu", "threads", "cause (undecided)"), ("m/cpu", "serving", "reported undecided"),
        ("m/cpu-int8", "threads", "cause (decided)")}
    assert sd.flips(runs[:1])["flips"] == 0


def test_cost_is_the_extra_timing_of_the_cases_that_measured_more():
    runs = [{"targets": {"a": _t(extra=(0.0, 2.0)), "b": _t(extra=(4.0,))}}, {"targets": {"a": _t(extra=(0.0,))}}]
    c = sd.cost(runs)
    assert (c["gate_batches"], c["measured_more"], c["median_s"], c["max_s"], c["total_s"]) == (4, 2, 3.0, 4.0, 6.0)
    assert sd.cost([{"targets": {"a": _t()}}])["max_s"] == 0.0


def test_run_record_reads_gates_extra_timing_and_serving_from_the_reports(tmp_path):
    rep = tmp_path / "report.json"
    rep.write_text(json.dumps({"data": {"latency": {
        "decisions": {"1": {"not-slower@batch1": {"outcome": "undecided"}}}, "extra_timing_s": {"1": 1.5}}}}))
    srep = tmp_path / "serve.json"
    srep.write_text(json.dumps({"decision": {"outcome": "fail"}}))
    summary = {"targets": [{"model": "cnn", "target": "cpu-int8", "status": "ok", "published": {"status": "ok"},
                            "stages": {"validate": {"report": str(rep), "summary": {"machine_busy": True}},
                                       "serve": {"load": {"report": str(srep), "kept_published": True,
                                                          "chosen": {"label": "1x1", "config": {"i": 1}}}}}}]}
    orep = tmp_path / "model.report.json"
    orep.write_text(json.dumps({"data": {"candidate": {"threads": {
        "best_intra_op_threads": 1, "why": "1 thread kept", "measured": {"1": {}, "2": {
            "decision_vs_1": {"outcome": "undecided"}}}}}}}))
    summary["targets"][0]["stages"]["optimize"] = {"report": str(orep)}
    t = sd.run_record(summary)["cnn/cpu-int8"]
    assert (t["threads"], t["threads_why"], t["threads_undecided"]) == (1, "1 thread kept", True)
    assert t["published"] and t["undecided"] and t["gates"] == {"not-slower@batch1": "undecided"}
    assert t["extra_timing_s"] == [1.5] and t["serving_label"] == "1x1" and t["serving_kept"]
    assert t["serving_decision"] == "fail" and not t["serving_undecided"] and t["machine_busy"]


def test_render_shows_the_figures_and_the_flips():
    from bench.stats import summarize

    pairs = [{"rounds": 50, "wall": sd.pair_interval([1, 1.1, 1.2], [1.05, 1.1, 1.15]),
              "cpu": sd.pair_interval([1, 1, 1], [1, 1, 1]), "not_slower": "pass", "wall_ms": 1.0, "cpu_ms": 0.9}]
    ph = sd._phase(pairs, {"loadavg": [3.0, 2.0, 1.0], "others_cpu_pct": 60.0, "busy": True})
    runs = [{"phase": "quiet", "machine": {}, "targets": {"m/cpu": _t()}},
            {"phase": "loaded", "machine": {"busy": True}, "targets": {"m/cpu": _t(serving="b")}}]
    d = {"model": "cnn", "hog": "python busy loop x 2", "pairs_per_phase": 1, "seconds_per_pair": 0.25,
         "goal_honesty": 0.95, "honesty": {"quiet": ph, "loaded": ph, "load_robust": sd.load_robust(pairs, pairs)},
         "pipeline": {"runs": runs, "stability": sd.flips(runs), "cost": sd.cost(runs)}}
    assert d["honesty"]["load_robust"]["wall_loaded_over_quiet"] == summarize([1.0], unit="x")
    out = sd.render(d)
    assert "1/1 (CI has 1: 1" in out and "flips: 1" in out and "FLIP: run 1 m/cpu serving: a -> b" in out
    assert "BUSY load [3.0, 2.0, 1.0]" in out
