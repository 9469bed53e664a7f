"""bench/compare.py flags >10 % regressions; the harness's statistics and per-child RSS are right.

No timing assertions: latency loops run on a fake clock.
"""
from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest

from bench import compare as cmp
from bench.proc import run_child
from bench.stats import interleaved, quantile, ratio_summary, summarize


def test_summarize_median_and_spread():
    m = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (m["median"], m["p25"], m["p75"], m["iqr"], m["min"], m["max"], m["n"]) == (3.0, 2.0, 4.0, 2.0, 1.0, 5.0, 5)
    assert m["better"] == "lower" and m["unit"] == "s"
    assert summarize([2.0, 1.0])["median"] == 1.5
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([1.0], better="faster")


def test_quantile_matches_numpy():
    xs = list(np.random.default_rng(3).standard_normal(37))
    for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        assert quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)))


def test_ratio_summary_pairs_rounds():
    num, den = [2.0, 4.0, 6.0], [1.0, 1.0, 4.0]
    r = ratio_summary(num, den)
    assert r["median"] == pytest.approx(2.0)  # per-round ratios: 2, 4, 1.5
    assert r["ratio_of_medians"] == pytest.approx(4.0 / 1.0)
    assert (r["min"], r["max"]) == (1.5, 4.0)
    assert r["unit"] == "x"
    with pytest.raises(ValueError):
        ratio_summary([1.0], [1.0, 2.0])


def test_interleaved_rotates_and_respects_rounds():
    calls, now = [], [0.0]

    def clock():
        now[0] += 1.0
        return now[0]

    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    s = interleaved(fns, warmup=1, min_rounds=4, max_rounds=50, budget_s=0.0, clock=clock)
    assert {k: len(v) for k, v in s.items()} == {"a": 4, "b": 4, "c": 4}
    timed = calls[3:]  # after one warm-up round
    assert timed[:3] == ["a", "b", "c"] and timed[3:6] == ["b", "c", "a"] and timed[6:9] == ["c", "a", "b"]
    assert all(x == 1.0 for v in s.values() for x in v)  # one fake tick per timed call
    # a budget keeps it going past min_rounds, max_rounds stops it
    s = interleaved({"x": lambda: None}, warmup=0, min_rounds=1, max_rounds=7, budget_s=1e9, clock=clock)
    assert len(s["x"]) == 7


def _metric(median, better="lower", unit="s", spread=0.001):
    return {"median": median, "p25": median - spread, "p75": median + spread, "n": 5, "unit": unit, "better": better}


@pytest.fixture
def results(tmp_path):
    old = {"machine": {"cpu_model": "X", "cpus_usable": 2}, "settings": {"quick": False, "threads": 2},
           "sections": {
               "cold_start": {"status": "ok", "commands": {"retool --help": {"wall": _metric(0.100)}}},
               "models": {"status": "ok", "models": {"cnn": {
                   "convert": {"wall": _metric(10.0), "peak_rss_mib": _metric(500.0, unit="MiB")},
                   "targets": {"targets": {"cpu-int8": {
                       "latency_vs_fp32": {"1": _metric(0.50, unit="x")},
                       "parity": {"top1_agreement": {"value": 1.0, "unit": "", "better": "higher"},
                                  "cosine_min": {"value": 0.999, "unit": "", "better": "higher"}}}}}}}},
               "large_model": {"status": "ok", "stages": {"convert_onnx": {
                   "rss_over_model_size": {"value": 1.4, "unit": "x", "better": "lower"}}}},
           }}
    new = copy.deepcopy(old)
    s = new["sections"]
    s["cold_start"]["commands"]["retool --help"]["wall"] = _metric(0.115)  # 15 % slower: flagged
    s["models"]["models"]["cnn"]["convert"]["wall"] = _metric(10.8)  # 8 % slower: within threshold
    s["models"]["models"]["cnn"]["convert"]["peak_rss_mib"] = _metric(300.0, unit="MiB")  # better
    t = s["models"]["models"]["cnn"]["targets"]["targets"]["cpu-int8"]
    t["parity"]["top1_agreement"]["value"] = 0.85  # higher is better: 15 % worse, flagged
    s["large_model"] = {"status": "skipped", "reason": "not enough memory"}
    po, pn = tmp_path / "old.json", tmp_path / "new.json"
    po.write_text(json.dumps(old))
    pn.write_text(json.dumps(new))
    return old, new, po, pn


def test_compare_flags_each_regression_over_threshold(results):
    old, new, _, _ = results
    changes, only_old, only_new = cmp.compare(old, new)
    flagged = {c.path for c in cmp.regressions(changes)}
    assert flagged == {"cold_start.commands.retool --help.wall",
                       "models.models.cnn.targets.targets.cpu-int8.parity.top1_agreement"}
    by = {c.path: c for c in changes}
    assert by["models.models.cnn.convert.wall"].worse_by == pytest.approx(0.08)
    assert by["models.models.cnn.convert.peak_rss_mib"].worse_by == pytest.approx(-0.4)
    assert by["models.models.cnn.targets.targets.cpu-int8.parity.top1_agreement"].worse_by == pytest.approx(0.15)
    assert only_old == ["large_model.stages.convert_onnx.rss_over_model_size"] and only_new == []
    # a stricter threshold catches the 8 % one too
    assert "models.models.cnn.convert.wall" in {c.path for c in cmp.regressions(changes, 0.05)}


def test_a_change_inside_the_noise_is_undecided_not_a_regression(tmp_path, capsys):
    """12 % slower by the medians, but with an IQR of 20 % over 5 runs the intervals say nothing."""
    def run(median):
        return {"machine": {}, "settings": {}, "sections": {"s": {"status": "ok", "wall": _metric(median, spread=0.01)}}}
    old, new = tmp_path / "o.json", tmp_path / "n.json"
    old.write_text(json.dumps(run(0.100)))
    new.write_text(json.dumps(run(0.112)))
    [c] = cmp.compare(run(0.100), run(0.112))[0]
    d = c.decision()
    assert c.worse_by == pytest.approx(0.12) and d.outcome == "undecided" and c.interval[0] < 0.10 < c.interval[1]
    assert cmp.regressions([c]) == [] and cmp.regressions([c], undecided="fail") == [c]
    assert cmp.main([str(old), str(new)]) == 0 and "UNDECIDED" in capsys.readouterr().out
    assert cmp.main([str(old), str(new), "--undecided", "fail"]) == 1


def test_compare_cli_exit_codes(results, tmp_path, capsys):
    _, _, po, pn = results
    assert cmp.main([str(po), str(pn)]) == 1
    out = capsys.readouterr().out
    assert out.count("REGRESSION") == 2 and "section large_model skipped" in out
    assert cmp.main([str(po), str(po)]) == 0  # identical runs: nothing flagged
    assert cmp.main([str(pn), str(po)]) == 1  # the reverse direction: help got faster, rss got worse (+67 %)
    bad = tmp_path / "bad.json"
    bad.write_text("{\"not\": \"a result\"}")
    assert cmp.main([str(po), str(bad)]) == 2
    assert "not a bench result" in capsys.readouterr().err


def test_child_peak_rss_is_per_child():
    """wait4 gives each child its own peak; RUSAGE_CHILDREN would keep reporting the largest so far."""
    big = run_child([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"], timeout=60)
    small = run_child([sys.executable, "-c", "pass"], timeout=60)
    assert big.ok and small.ok
    assert big.maxrss_bytes > 300 * 2**20
    assert small.maxrss_bytes < 100 * 2**20
    failing = run_child([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=60)
    assert failing.rc == 3 and not failing.ok and failing.stdout.strip() == "out"


def test_run_writes_result_with_machine_and_table(tmp_path):
    """End to end on the cheapest section: one JSON with the machine, the figures and a printed table."""
    import subprocess

    from bench.proc import ROOT

    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--sections", "cold_start",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    files = list(tmp_path.glob("bench-*-quick.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["complete"] is True and data["settings"]["quick"] is True
    assert data["machine"]["cpus_usable"] >= 1 and data["machine"]["versions"]["onnxruntime"]
    sec = data["sections"]["cold_start"]
    assert sec["status"] == "ok" and sec["machine"]["cpu_model"] == data["machine"]["cpu_model"]
    assert {"loadavg", "steal_pct", "others_cpu_pct", "busy", "isa", "governor"} <= set(sec["machine"])
    wall = sec["commands"]["retool convert --help"]["wall"]
    assert wall["n"] == 3 and wall["min"] <= wall["median"] <= wall["max"]
    assert "retool convert --help" in r.stdout and str(files[0]) in r.stdout
    assert cmp.main([str(files[0]), str(files[0])]) == 0
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--sections", "nope", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "unknown section" in r.stderr


def test_compare_flags_retool_behind_the_peer(tmp_path, capsys):
    """The peers section: retool slower than plain ORT beyond the noise (or less faithful) is flagged."""
    def run(lat_p25, top1):
        return {"machine": {}, "settings": {}, "sections": {"peers": {"status": "ok", "models": {"cnn": {
            "retool_over_peer": {"retool cpu-int8": {
                "latency": {"1": {**_metric(lat_p25 + 0.05, unit="x"), "p25": lat_p25}},
                "top1": {"value": top1, "unit": "x", "better": "higher"},
                "behind": ([] if lat_p25 <= 1.0 else ["latency at 1 thread(s)"])
                + ([] if top1 >= 1.0 else ["top-1 agreement"])}}}}}}}
    ahead, behind = tmp_path / "a.json", tmp_path / "b.json"
    ahead.write_text(json.dumps(run(0.95, 1.05)))
    behind.write_text(json.dumps(run(1.08, 0.9)))
    assert cmp.behind_peers(json.loads(ahead.read_text())) == []
    assert cmp.main([str(ahead), str(ahead)]) == 0
    assert cmp.main([str(ahead), str(behind)]) == 1
    out = capsys.readouterr().out
    assert "BEHIND PEER: cnn: retool cpu-int8 is behind the peer in latency at 1 thread(s), top-1 agreement" in out


def test_peers_section_table_renders():
    from bench.report import render

    d = {"status": "ok", "models": {"cnn": {"status": "ok", "latency": {"1": {}, "2": {}}, "retool_over_peer": {},
                                            "variants": {"peer": {"top1": 0.9, "cosine": 0.99, "size_vs_fp32": 0.26,
                                                                  "vs_fp32": {"1": _metric(0.5, unit="x", spread=0.01)}}}}}}
    table = render("peers", d)
    assert "peer" in table and "0.900" in table and "0.50 [0.49-0.51]" in table
