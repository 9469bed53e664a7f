"""retool validate: parity at every batch size, gates, latency bookkeeping, CLI exit codes.

ONNX-vs-ONNX references built with onnx.helper (fixtures/onnx_models.py) keep these fast.
Latency is never asserted as a timing: only that it was measured and reported consistently.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from fixtures import onnx_models
from retool.errors import UsageError
from retool.validators.core import validate
from retool.validators.gates import Gates, load_gates


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("validate_models")
    return {
        "ref": onnx_models.linear(d / "ref.onnx"),
        "leak": onnx_models.linear(d / "leak.onnx", batch_leak=True),
        "static": onnx_models.linear(d / "static.onnx", static_batch=1),
        "two_ref": onnx_models.two_outputs(d / "two_ref.onnx"),
        "two_off": onnx_models.two_outputs(d / "two_off.onnx", noise=0.01),
    }


def _check(report, name):
    return next(c for c in report.checks if c.name == name)


# -- parity across batch sizes ------------------------------------------------

def test_model_wrong_only_above_batch_1_fails_the_batch_size_check(models):
    r = validate(models["leak"], models["ref"], batch_sizes=(1, 8))
    assert not r.passed
    assert _check(r, "parity:y@batch1").passed  # right at batch 1 ...
    assert not _check(r, "parity:y@batch8").passed  # ... wrong at batch 8
    assert not _check(r, "batch-consistency:y@batch8").passed
    assert r.data["parity"]["y@batch1"]["max_abs"] == 0.0
    assert r.data["parity"]["y@batch8"]["max_abs"] > 0.1
    assert {g["name"] for g in r.data["gates"] if not g["passed"]} == {
        "parity:y@batch8", "batch-consistency:y@batch8"}


def test_batch_1_alone_still_checks_a_larger_batch_when_batch_is_dynamic(models):
    r = validate(models["leak"], models["ref"])  # default batch_sizes=(1,)
    assert r.data["batch_sizes"] == [1]
    assert r.data["parity_batch_sizes"] == [1, 4]
    assert not r.passed and not _check(r, "parity:y@batch4").passed


def test_row_consistency_catches_the_leak_without_a_reference(models):
    r = validate(models["leak"], batch_sizes=(1, 8))
    assert not r.passed
    assert [c.name for c in r.failed_checks] == ["batch-consistency:y@batch8"]
    assert r.data["parity"] == {} and r.data["reference"] is None


def test_correct_model_passes_at_every_batch_size(models):
    r = validate(models["ref"], models["ref"], batch_sizes=(1, 8, 32))
    assert r.passed, [c.to_dict() for c in r.failed_checks]
    assert r.stage == "validate"
    assert set(r.data["parity"]) == {"y@batch1", "y@batch8", "y@batch32"}
    for entry in r.data["parity"].values():
        assert {"max_abs", "mean_abs", "p99_abs", "max_rel", "cosine", "histogram"} <= set(entry)
        assert sum(entry["histogram"]["counts"]) == entry["size"]
    assert r.artifact.provenance[-1].stage == "validate"


def test_per_output_tolerance_from_gates(models):
    r = validate(models["two_off"], models["two_ref"], batch_sizes=(2,))
    assert not r.passed
    assert [c.name for c in r.failed_checks] == ["parity:z@batch2"]  # only z is off (by 0.01)
    assert r.data["parity"]["z@batch2"]["max_abs"] == pytest.approx(0.01, rel=1e-3)

    loose = {"parity": {"z": {"atol": 0.05, "rtol": 0, "min_cosine": None}}}
    r = validate(models["two_off"], models["two_ref"], batch_sizes=(2,), gates=loose)
    assert r.passed
    assert r.data["tolerances"]["z"]["atol"] == 0.05 and r.data["tolerances"]["z"]["min_cosine"] is None
    assert r.data["tolerances"]["y"]["atol"] == 1e-4  # the other output keeps the fp32 default
    gate = next(g for g in r.data["gates"] if g["name"] == "parity:z@batch2")
    assert gate["passed"] and gate["threshold"]["atol"] == 0.05 and gate["value"] == pytest.approx(0.01, rel=1e-3)


def test_example_inputs_are_used_and_resized_per_batch(models, tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    np.savez(tmp_path / "ex.npz", x=x)
    r = validate(models["ref"], models["ref"], batch_sizes=(1, 3), example_inputs=tmp_path / "ex.npz")
    assert r.passed and r.data["parity"]["y@batch3"]["size"] == 3 * onnx_models.OUT_FEATURES
    with pytest.raises(UsageError, match="no array for input"):
        np.savez(tmp_path / "bad.npz", tokens=x)
        validate(models["ref"], models["ref"], example_inputs=tmp_path / "bad.npz")


# -- latency -----------------------------------------------------------------

def test_latency_is_measured_for_both_variants_and_the_ratio_reported(models):
    r = validate(models["ref"], models["leak"], batch_sizes=(1, 4), latency=True, threads=1, runs=7,
                 time_budget_s=0)  # 0 s: exactly --runs
    lat = r.data["latency"]
    assert lat["measured"] and r.data["threads"] == 1
    for variant in ("candidate", "reference"):
        assert set(lat[variant]) == {"1", "4"}
        for b, s in lat[variant].items():
            assert s["runs"] == 7 and len(s["samples_ms"]) == 7
            assert s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
            assert s["throughput_per_s"] == pytest.approx(int(b) * 1000 / s["p50_ms"])  # the median, not the mean
    for b in ("1", "4"):
        ratio = lat["reference"][b]["p50_ms"] / lat["candidate"][b]["p50_ms"]
        assert lat["speedup"][b] == pytest.approx(ratio, rel=1e-3)


def test_interleaving_alternates_the_order_of_variants():
    from retool.validators.latency import Plan, measure_interleaved

    calls = []
    samples = measure_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                  Plan(runs=4, warmup=1))
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then ABBA...
    assert [len(v) for v in samples.values()] == [4, 4]


def test_time_budget_bounds_the_number_of_runs():
    from retool.validators.latency import Plan, measure_interleaved, summarize

    plan = Plan(runs=None, time_budget_s=0.05, warmup=0, min_runs=3, max_runs=40)
    samples = measure_interleaved({"a": lambda: None}, plan)
    assert 3 <= len(samples["a"]) <= 40
    s = summarize(list(range(1, 101)), batch=2, keep=10)
    assert s["p50_ms"] == pytest.approx(50.5) and s["runs"] == 100 and len(s["samples_ms"]) == 10


def test_node_placement_lists_every_node_on_its_provider(cnn_onnx):
    from retool.validators.providers import node_placement

    feeds = {"x": np.zeros((1, 3, 32, 32), np.float32)}
    p = node_placement(cnn_onnx, feeds, threads=1)
    assert p["nodes_total"] > 0
    assert p["nodes_per_provider"] == {"CPUExecutionProvider": p["nodes_total"]}
    assert "Conv" in p["ops_per_provider"]["CPUExecutionProvider"] or any(
        "Conv" in op for op in p["ops_per_provider"]["CPUExecutionProvider"])


# -- gates -------------------------------------------------------------------

def test_load_gates_from_yaml_and_mapping(tmp_path):
    f = tmp_path / "gates.yaml"
    f.write_text("max_p99_ms: {1: 5, 8: 20}\nmin_speedup: 1.5\nmax_size_mb: 10\n"
                 "parity:\n  '*': {atol: 1.0e-3}\n  logits: {atol: null, min_top1: 0.9}\n")
    g = load_gates(f)
    assert g == Gates({1: 5.0, 8: 20.0}, 1.5, 10.0, {"*": {"atol": 1e-3}, "logits": {"atol": None, "min_top1": 0.9}})
    assert g.needs_latency
    assert load_gates(None) == Gates() and not Gates().needs_latency
    assert load_gates({"max_size_mb": "2.5"}).max_size_mb == 2.5


@pytest.mark.parametrize("text, match", [
    ("max_p99: 3\n", "unknown gate key"),
    ("max_size_mb: lots\n", "must be a number"),
    ("max_size_mb: -1\n", ">= 0"),
    ("parity:\n  y: {tolerance: 1}\n", "unknown key"),
    ("max_p99_ms: {one: 3}\n", "batch sizes"),
    ("[1, 2\n", "not valid YAML"),
    ("- 1\n", "expected a mapping"),
])
def test_bad_gates_file_is_one_clear_usage_error(tmp_path, text, match):
    f = tmp_path / "gates.yaml"
    f.write_text(text)
    with pytest.raises(UsageError, match=match) as exc:
        load_gates(f)
    assert str(f) in str(exc.value) and "\n" not in str(exc.value)


def test_gates_pass_and_fail_as_they_should(models):
    ok = validate(models["ref"], models["ref"], runs=3, threads=1,
                  gates={"max_p99_ms": 60_000, "min_speedup": 1e-6, "max_size_mb": 1})
    assert ok.passed
    names = {g["name"] for g in ok.data["gates"]}
    assert {"size", "latency:p99@batch1", "speedup@batch1"} <= names
    for g in ok.data["gates"]:
        assert g["threshold"] is not None and g["value"] is not None

    bad = validate(models["ref"], models["ref"], runs=3, threads=1,
                   gates={"max_p99_ms": 1e-9, "min_speedup": 1e9, "max_size_mb": 1e-9})
    assert not bad.passed
    assert {c.name for c in bad.failed_checks} == {"size", "latency:p99@batch1", "speedup@batch1"}
    size = next(g for g in bad.data["gates"] if g["name"] == "size")
    assert size["value"] == pytest.approx(bad.data["size_mb"], rel=1e-3) and size["threshold"] == 1e-9


def test_latency_budget_for_an_unmeasured_batch_fails(models):
    r = validate(models["ref"], models["ref"], runs=2, gates={"max_p99_ms": {8: 1000}})
    assert not r.passed
    assert "not measured" in _check(r, "latency:p99@batch8").message


def test_usage_errors(models, tmp_path):
    with pytest.raises(UsageError, match="needs a reference"):
        validate(models["ref"], gates={"min_speedup": 1.0})
    with pytest.raises(UsageError, match="fixed at 1"):
        validate(models["static"], models["ref"], batch_sizes=(1, 8))
    with pytest.raises(UsageError, match="not found"):
        validate(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(UsageError, match="not a readable ONNX model"):
        validate(tmp_path / "junk.onnx")
    with pytest.raises(UsageError, match="no such input"):
        validate(models["ref"], inputs=["tokens:int64:batch,4"])


def test_candidate_that_does_not_load_in_onnxruntime_fails_its_gate(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], domain="retool.test")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("retool.test", 1)])
    onnx.save(m, str(tmp_path / "bad.onnx"))
    r = validate(tmp_path / "bad.onnx")
    assert not r.passed and [c.name for c in r.failed_checks] == ["onnxruntime.load"]


# -- CLI ---------------------------------------------------------------------

def test_cli_impossible_budget_exits_6_and_prints_the_gate_table(cli, models, tmp_path):
    r = cli("validate", models["ref"], "--reference", models["ref"], "--runs", "3", "--threads", "1",
            "--max-p99-ms", "0.000001", "--report-dir", tmp_path / "rep")
    assert r.code == 6, r.err
    assert "gates:" in r.out and "latency:p99@batch1" in r.out and "FAIL" in r.out
    assert "retool: error:" in r.err and "latency:p99@batch1" in r.err and "Traceback" not in r.err
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["passed"] is False
    gate = next(g for g in data["data"]["gates"] if g["name"] == "latency:p99@batch1")
    assert gate["threshold"] == 1e-6 and gate["passed"] is False


def test_cli_failure_line_names_each_failing_gate_its_miss_and_the_fix(cli, models):
    """`<problem>; <fix>`: the last line alone says which gates failed, by how much and what to do; a p99
    budget says it applies per batch and how many runs are behind that p99."""
    r = cli("validate", models["ref"], "--batch-sizes", "1,8", "--runs", "5", "--time-budget", "0", "--threads", "1",
            "--max-p99-ms", "0.000001", "--max-size-mb", "0.000001")
    assert r.code == 6, r.err
    last = r.err.strip().splitlines()[-1]
    assert "3 gate(s) failed: size " in last and " MB > 1e-06 MB" in last and "raise --max-size-mb" in last
    assert "latency:p99@batch8 (per batch of 8, 5 runs)" in last and "ms > 1e-06 ms" in last
    assert "raise --max-p99-ms" in last and "gate table above" not in last
    assert "p99 per batch of 8 <= 1e-06 ms (5 runs)" in r.out and "latency:p99@batch8 (per batch of 8, 5 runs)" in r.out


def test_cli_passing_run_prints_one_table_with_parity_latency_speedup_and_size(cli, models, tmp_path):
    gates = tmp_path / "gates.yaml"
    gates.write_text("max_p99_ms: 60000\nmax_size_mb: 5\n")
    r = cli("validate", models["ref"], "--reference", models["ref"], "--batch-sizes", "1,8", "--runs", "3",
            "--gates", gates, "--min-speedup", "0.000001")
    assert r.code == 0, r.out + r.err
    header = r.out.splitlines()[0].split()
    assert header == ["check", "batch", "candidate", "reference", "threshold", "result"]
    for word in ("parity y", "latency p50 / p99 ms", "throughput", "speed-up", "size MB"):
        assert word in r.out
    assert "PASS" in r.out and "FAIL" not in r.out


def test_cli_json_and_usage_exit_codes(cli, models, tmp_path):
    r = cli("validate", models["leak"], "--reference", models["ref"], "--batch-sizes", "1,2", "--json")
    assert r.code == 6
    report = json.loads(r.out)
    assert report["stage"] == "validate" and report["passed"] is False
    r = cli("validate", models["ref"], "--min-speedup", "2")
    assert r.code == 2 and "--reference" in r.err
    r = cli("validate", models["ref"], "--batch-sizes", "0,x")
    assert r.code == 2 and "--batch-sizes" in r.err
    (tmp_path / "g.yaml").write_text("max_p99_ms: fast\n")
    r = cli("validate", models["ref"], "--gates", tmp_path / "g.yaml")
    assert r.code == 2 and "g.yaml" in r.err and "Traceback" not in r.err
    r = cli("validate", models["ref"], "--report-dir", models["ref"])
    assert r.code == 2 and "is a file" in r.err
    r = cli("validate", models["ref"], "--reference", tmp_path / "missing.pt")
    assert r.code == 2 and "missing.pt" in r.err and "not found" in r.err


def test_cli_tolerance_flags_apply_to_every_output(cli, models):
    r = cli("validate", models["two_off"], "--reference", models["two_ref"], "--batch-sizes", "2")
    assert r.code == 6
    r = cli("validate", models["two_off"], "--reference", models["two_ref"], "--batch-sizes", "2",
            "--atol", "0.05", "--min-cosine", "0.99")
    assert r.code == 0, r.out


def test_fp16_io_candidate_against_fp32_reference(models, tmp_path):
    import onnx
    from onnxconverter_common import float16

    m = float16.convert_float_to_float16(onnx.load(str(models["ref"])), keep_io_types=False)
    onnx.save(m, str(tmp_path / "fp16.onnx"))
    r = validate(tmp_path / "fp16.onnx", models["ref"], batch_sizes=(1, 8))
    assert r.data["candidate"]["precision"] == "fp16"
    assert r.data["tolerances"]["y"]["atol"] == 1e-2  # fp16 defaults
    assert r.passed, [c.to_dict() for c in r.failed_checks]
    assert 0 < r.data["parity"]["y@batch8"]["max_abs"] < 1e-2  # really ran in half precision


def test_static_batch_model_is_validated_at_its_own_batch(tmp_path):
    ref = onnx_models.linear(tmp_path / "static2.onnx", static_batch=2)
    r = validate(ref, ref)  # default batch 1 cannot run: use the fixed batch, and say so
    assert r.passed and r.data["batch_sizes"] == [2] and r.data["parity_batch_sizes"] == [2]
    assert any("fixed at 2" in w for w in r.warnings)
