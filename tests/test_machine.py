"""The machine's state travels with every figure (retool.machine): simulated /proc readers only."""
from __future__ import annotations

import json

from retool import machine

QUIET_STAT = "cpu  100 0 100 800 0 0 0 0 0 0\n"
CPUINFO = "processor: 0\nmodel name: Test CPU 9000\nflags: fpu avx2 fma avx512_vnni\n"


def _stat_seq(*lines):
    it = iter(lines)
    return lambda: next(it)


def test_load_above_the_cores_is_busy_with_the_advice():
    with machine.use_readers(loadavg=lambda: "5.50 4.00 3.00 7/300 123", cpus=lambda: 2, cpuinfo=lambda: CPUINFO,
                             governor=lambda: "performance\n"):
        s = machine.state()
    assert s["busy"] and s["loadavg"] == [5.5, 4.0, 3.0] and s["cores"] == 2 and "quiet machine" in s["advice"]
    assert s["cpu_model"] == "Test CPU 9000" and s["isa"] == ["avx2", "fma", "avx512_vnni"]
    assert s["governor"] == "performance"
    assert machine.describe(s).startswith("BUSY: load 5.5/4/3 on 2 cores") and "pin threads" in machine.describe(s)
    with machine.use_readers(loadavg=lambda: "0.50 0.40 0.30 1/300 123", cpus=lambda: 2):
        q = machine.state()
    assert not q["busy"] and q["advice"] is None and not machine.describe(q).startswith("BUSY")
    with machine.use_readers(loadavg=lambda: None, stat=lambda: None):  # off Linux: no figures, not busy
        assert machine.state()["loadavg"] is None and not machine.state()["busy"]


def test_a_timed_block_records_steal_and_the_other_processes_share():
    # 2 CPUs, 1 s: 200 jiffies; this process used 0.5 CPU-s (25 %); the machine was 90 % busy, 5 % stolen
    t = iter([1e12, 1e12 + 1.0])  # later than any real block this process recorded
    own = iter([10.0, 10.5])
    stat = _stat_seq("cpu  1000 0 0 1000 0 0 0 0 0 0\n", "cpu  1170 0 0 1020 0 0 0 10 0 0\n")
    with machine.use_readers(clock=lambda: next(t), own_cpu_s=lambda: next(own), stat=stat, cpus=lambda: 2,
                             total_cpus=lambda: 2, loadavg=lambda: "1.0 1.0 1.0 1/1 1"):
        since = 1e12
        with machine.watch("timing"):
            pass
        m = machine.during(since)
    assert m["steal_pct"] == 5.0 and m["others_cpu_pct"] == 60.0 and m["blocks"] == 1
    assert m["busy"]  # others used more than half the CPUs, although the load average looked fine


def test_a_validate_report_carries_the_machine_and_the_busy_flag(tmp_path):
    from fixtures.onnx_tiny import linear
    from retool.validators.core import summary_text, validate
    from retool.validators.report_md import render_markdown

    model = linear(tmp_path / "m.onnx")
    with machine.use_readers(loadavg=lambda: "19.0 12.0 5.0 9/300 1", cpus=lambda: 2):
        rep = validate(model, model, latency=True, threads=1, runs=5, time_budget_s=0)
    m = json.loads(rep.to_json())["data"]["machine"]
    assert m["busy"] and m["loadavg"][0] == 19.0 and m["blocks"] >= 1 and "steal_pct" in m
    assert "machine while timing: BUSY" in summary_text(rep) and "busy machine" in summary_text(rep)
    assert "**Machine while timing:** ⚠️ BUSY" in render_markdown(rep)
    assert any(w.startswith("BUSY") for w in rep.warnings)
    # at 1 intra-op thread the thread CPU time is reported beside wall time
    assert rep.data["latency"]["candidate"]["1"]["cpu_p50_ms"] > 0


def test_the_serving_thread_count_is_not_decided_on_a_busy_machine(tmp_path):
    import itertools

    import numpy as np
    import pytest

    from fixtures.onnx_tiny import linear
    from retool.optimizers.latency import all_threads, thread_sweep

    if all_threads() < 2:
        pytest.skip("one usable core: there is only one thread count")
    model = linear(tmp_path / "m.onnx")
    feeds = {"x": np.ones((1, 4), np.float32)}
    k = itertools.count()

    def stat():  # each reading: 95 % of the CPUs busy since the last, none of it this process's
        i = next(k)
        return f"cpu  {1000 + 190 * i} 0 0 {1000 + 10 * i} 0 0 0 0 0 0\n"
    with machine.use_readers(stat=stat, own_cpu_s=lambda: 0.0, total_cpus=lambda: 2):
        out = thread_sweep(model, model, feeds, budget_s=0.2)
    d = out["measured"][str(all_threads())]["decision_vs_1"]
    assert d["outcome"] == "undecided" and "busy machine" in d["note"] and out["machine"]["others_cpu_pct"] > 50
    assert out["best_intra_op_threads"] == 1 and "undecided" in out["why"]
