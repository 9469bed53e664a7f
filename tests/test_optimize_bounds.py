"""An accuracy goal is a statistical claim: judged on a lower confidence bound, refused when unshowable."""
from __future__ import annotations

import json

import numpy as np
import pytest

from retool.errors import UsageError


def test_clopper_pearson_matches_the_beta_quantile():
    """The pure-Python bound equals scipy's exact Beta quantile (one-sided 95 %)."""
    stats = pytest.importorskip("scipy.stats")
    from retool.validators.bounds import lower_bound

    for n in (1, 8, 32, 64, 99, 500):
        for k in sorted({0, 1, n // 2, int(n * 0.875), n - 1, n}):
            want = 0.0 if k == 0 else float(stats.beta.ppf(0.05, k, n - k + 1))
            assert lower_bound(k, n) == pytest.approx(want, abs=1e-9), (k, n)


def test_rows_needed_and_the_issues_case():
    """8/8 agreeing rows cannot show 0.97 (the bound is 0.688); 99 rows are the fewest that can."""
    from retool.validators.bounds import lower_bound, rows_needed

    assert lower_bound(8, 8) == pytest.approx(0.05 ** (1 / 8))
    assert rows_needed(0.97) == 99 and lower_bound(99, 99) >= 0.97 > lower_bound(98, 98)
    assert rows_needed(0.9) == 29 and rows_needed(1.0) == 1
    # a model right 87.5 % of the time passes 8/8 about a third of the time: the share alone is no claim
    assert 0.3 < 0.875 ** 8 < 0.35


def _scores(n, disagree, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((n, classes)).astype(np.float32)
    cand = ref + 1e-6 * rng.standard_normal(ref.shape).astype(np.float32)
    for i in range(disagree):  # swap the top class away
        j = int(np.argmax(ref[i]))
        cand[i, j] = ref[i].min() - 1
    return ref, cand


def test_top1_goal_is_judged_on_the_bound_not_the_share():
    from retool.validators.parity import Tolerance, compare_output

    goal = Tolerance(atol=None, rtol=None, min_cosine=None, min_top1=0.97, confidence=0.95)
    share_only = Tolerance(atol=None, rtol=None, min_cosine=None, min_top1=0.97)
    ref, cand = _scores(8, 0)
    assert compare_output("y", ref, cand, share_only).passed  # 8/8: the old rule passed it
    r = compare_output("y", ref, cand, goal)
    assert not r.passed and r.details["top1"] == 1.0 and r.details["top1_lower"] == pytest.approx(0.6877, abs=1e-4)
    assert "8/8" in r.message and "Clopper-Pearson" in r.message
    ref, cand = _scores(200, 1)  # 199/200: share 0.995, bound 0.976
    r = compare_output("y", ref, cand, goal)
    assert r.passed and r.details["top1_agree"] == 199 and r.details["top1_lower"] > 0.97
    ref, cand = _scores(200, 6)  # 194/200 = 0.97 by share, but not shown
    assert compare_output("y", ref, cand, share_only).passed
    assert not compare_output("y", ref, cand, goal).passed


def test_cosine_goal_needs_every_row():
    """One row far off hides in the whole output's cosine; the goal's per-row minimum catches it."""
    from retool.validators.parity import Tolerance, compare_output

    rng = np.random.default_rng(1)
    ref = rng.standard_normal((50, 64)).astype(np.float32)
    cand = ref.copy()
    cand[7] = rng.standard_normal(64).astype(np.float32)  # one unrelated row
    ref[7] *= 0.05  # small in norm, so the aggregate barely notices
    cand[7] *= 0.05
    plain = Tolerance(atol=None, rtol=None, min_cosine=0.99, min_top1=None)
    goal = Tolerance(atol=None, rtol=None, min_cosine=0.99, min_top1=None, confidence=0.95)
    assert compare_output("y", ref, cand, plain).passed
    r = compare_output("y", ref, cand, goal)
    assert not r.passed and r.details["cosine"] >= 0.99 and r.details["cosine_min_row"] < 0.5
    assert "lowest per-row cosine" in r.message


def test_goal_carries_its_bound_into_the_tolerance():
    from retool.optimizers.goal import parse_goal

    g = parse_goal("top1>=0.97,cos>=0.999")
    assert g.tolerance_overrides()["confidence"] == 0.95 and g.rows_needed() == 99
    d = g.to_dict()
    assert "Clopper-Pearson" in d["judged_on"] and "per-row cosine" in d["judged_on"] and d["rows_needed"] == 99


def test_heldout_split_follows_the_goal_and_the_flag(tmp_path):
    from retool.optimizers.calibration import open_calibration
    from retool.types import TensorSpec

    specs = [TensorSpec("x", "float32", (1, 4))]
    p = tmp_path / "c.npz"
    np.savez(p, x=np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32))
    assert len(open_calibration(p, specs).heldout_items) == 32  # the default cap
    assert len(open_calibration(p, specs, goal_heldout=99).heldout_items) == 99
    assert len(open_calibration(p, specs, goal_heldout=400).heldout_items) == 150  # at most half the data
    assert len(open_calibration(p, specs, heldout=120).heldout_items) == 120
    with pytest.raises(UsageError, match="--heldout 300: .* holds 300 sample"):
        open_calibration(p, specs, heldout=300)
    assert len(open_calibration(None, specs, goal_heldout=99).heldout_items) == 99  # random stand-ins


def test_unshowable_goal_is_refused_before_any_work(cli, cnn_onnx, tmp_path):
    """20 samples hold out 4: no agreement can show top1>=0.97; one line says what is needed."""
    data = tmp_path / "c.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((20, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "m.onnx"
    r = cli("optimize", cnn_onnx, "--target", "cpu-int8", "-o", out, "--calibration", data,
            "--accuracy", "top1>=0.97", "--no-measure")
    assert r.code == 2 and not out.exists(), r.err
    err = [ln for ln in r.err.splitlines() if ln.startswith("retool: error")]
    assert len(err) == 1 and "cannot be shown with 10 held-out rows" in err[0], r.err
    assert "at least 99" in err[0] and "--heldout 99" in err[0] and "Traceback" not in r.err


@pytest.mark.slow
def test_goal_report_records_the_bound(cnn_onnx, tmp_path):
    """Random held-out data grows to what the goal needs; the report carries the bound it was judged on."""
    from retool.errors import ValidationFailed
    from retool.optimizers.core import optimize

    try:
        _, rep = optimize(cnn_onnx, tmp_path / "g.onnx", target="cpu-int8", accuracy="top1>=0.9", measure=False)
    except ValidationFailed as exc:  # met or not, the report says how it was judged
        rep = exc.report
    g = rep.data["accuracy_goal"]
    assert g["heldout_samples"] == 29 and g["rows_needed"] == 29 and "Clopper-Pearson" in g["judged_on"]
    par = rep.data["parity"]["parity:output@held-out"]
    assert rep.data["tolerance"]["confidence"] == 0.95
    json.dumps(rep.data)
    assert par["top1"] is not None


def test_heldout_in_the_pipeline_yaml(tmp_path):
    from retool.pipeline.config import load_config

    p = tmp_path / "retool.yaml"
    p.write_text("models:\n  - name: m\n    source: m.onnx\n    targets:\n      - name: cpu-int8\n"
                 "        accuracy: 'top1>=0.97'\n        calibration: {data: c.npz, heldout: 150}\n")
    assert load_config(p).models[0].targets[0].calibration["heldout"] == 150
    p.write_text(p.read_text().replace("heldout: 150", "heldout: 0"))
    with pytest.raises(UsageError, match="heldout"):
        load_config(p)


@pytest.fixture(scope="module")
def spread_cnn(tmp_path_factory):
    """The fixture CNN with batch-norm statistics recomputed and its scores standardised (as bench's
    anchor): class scores spread, so top-1 agreement depends on the quantization (plain fixture: 1.0)."""
    pytest.importorskip("torch")
    from bench.sec_peers import recalibrate_bn
    from fixtures import torch_models
    from retool.converter.core import convert

    m = recalibrate_bn(torch_models.cnn(), [3, 32, 32])
    art, _ = convert(m, tmp_path_factory.mktemp("spread") / "cnn.onnx", inputs=m.retool_inputs)
    return art.path


@pytest.mark.slow
def test_top1_goal_returns_int8_where_reachable_and_exit_6_with_the_bound_where_not(spread_cnn, tmp_path, cli):
    from retool.optimizers.core import optimize

    art, rep = optimize(spread_cnn, tmp_path / "ok.onnx", target="cpu-int8", accuracy="top1>=0.7", heldout=299,
                        measure=False)
    g = rep.data["accuracy_goal"]
    par = [c for c in rep.checks if c.name.startswith("parity")][0].details
    assert g["met"] and art.precision == "int8" and g["heldout_samples"] == 299
    assert par["top1_rows"] == 299 and 0.7 <= par["top1_lower"] < par["top1"] < 1.0  # int8 did cost agreement
    out = tmp_path / "never.onnx"
    r = cli("optimize", spread_cnn, "--target", "cpu-int8", "-o", out, "--accuracy", "top1>=0.99",
            "--heldout", "299", "--accuracy-budget", "1", "--no-measure")
    err = [ln for ln in r.err.splitlines() if ln.startswith("retool: error")]
    assert r.code == 6 and not out.exists() and err and "best reached top1 0." in err[0] and "top1 lower" in err[0]
