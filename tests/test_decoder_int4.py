"""int4 that keeps its accuracy (issue 23 item 3): rtn / gptq / hqq weight-only algorithms as target options,
and the perplexity gate on held-out text beside teacher-forced agreement."""
from __future__ import annotations

import json

import numpy as np
import pytest


# --- target options: no torch, no onnxruntime ---------------------------------------------------------
def test_target_options_apply_to_weight_only_targets():
    from retool.optimizers.targets import get_target

    p = get_target("cpu-int4:algorithm=hqq, accuracy_level=0,max_ppl_ratio=none")
    assert p.name == "cpu-int4"  # the folder and report name stay the target's
    assert (p.extra_options["algorithm"], p.extra_options["accuracy_level"], p.extra_options["max_ppl_ratio"]) == \
        ("hqq", 0, None)
    assert p.extra_options["bits"] == 4 and "hqq" in p.describe()
    assert get_target("cpu-int4").extra_options["algorithm"] == "gptq"  # the measured default
    assert get_target("cpu-int8-weight:free_running=false").extra_options["free_running"] is False


@pytest.mark.parametrize("spec, words", [
    ("cpu-int4:algorithm=awq", "rtn, gptq or hqq"),
    ("cpu-int4:accuracy_level=7", "0 (unset)"),
    ("cpu-int4:bits=2", "is not an option"),
    ("cpu-int4:max_ppl_ratio=0.9", "a ratio >= 1"),
    ("cpu-int8-weight:algorithm=gptq", "only for 4 bits"),
    ("cpu-int8:algorithm=rtn", "only weight-only targets"),
])
def test_bad_target_options_are_one_line_usage_errors(spec, words, tmp_path, cli):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")  # never read: the target is refused first
    r = cli("optimize", model, "--target", spec, "-o", tmp_path / "o.onnx")
    assert r.code == 2, (r.code, r.err)
    assert words in r.err and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1
