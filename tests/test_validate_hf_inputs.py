"""``retool validate --reference ./hf-folder/`` for an encoder: the random integer inputs stay inside
what the Hugging Face config allows (input_ids < vocab_size, token_type_ids < type_vocab_size, a
mask of ones), even when the candidate's graph hides its embedding tables (a quantized model that
travelled without its sidecar report)."""
from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("transformers")
pytestmark = [pytest.mark.torch, pytest.mark.slow]


def test_quantized_bert_without_its_report_validates_against_the_hf_folder(tmp_path, cli):
    from fixtures import hf_models
    from retool.onnx_info import artifact_from_onnx

    folder = hf_models.bert(tmp_path / "bert", classify=True)  # vocab 120, type_vocab_size 2
    assert cli("-q", "convert", folder, "-o", tmp_path / "bert.onnx").code == 0
    r = cli("-q", "optimize", tmp_path / "bert.onnx", "--target", "cpu-int8", "-o", tmp_path / "q.onnx",
            "--no-measure")
    assert r.code == 0, r.err
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "q.onnx", alone / "q.onnx")  # no sidecar report: only the graph says what it takes
    r = cli("validate", alone / "q.onnx", "--reference", folder, "--allow-slower", "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    ranges = {t["name"]: t.get("range") for t in rep["data"]["candidate"]["inputs"]}
    assert ranges == {"input_ids": [0, 119], "attention_mask": [1, 1], "token_type_ids": [0, 1]}
    assert all(c["passed"] for c in rep["checks"] if c["name"].startswith(("parity", "run@")))
    # the graph alone: a quantized (QDQ) embedding table still bounds the ids that index it
    got = {s.name: s.value_range for s in artifact_from_onnx(alone / "q.onnx").inputs}
    assert got["token_type_ids"] == (0, 1) and got["input_ids"] == (0, 119)


def test_a_range_the_user_gives_wins_over_the_config():
    from retool.input_ranges import hf_config_ranges, prefer
    from retool.types import TensorSpec

    class Cfg:
        vocab_size, type_vocab_size = 120, 2

    specs = (TensorSpec("input_ids", "int64", ("batch", "sequence"), (0, 50)),  # as validate merged --input
             TensorSpec("token_type_ids", "int64", ("batch", "sequence")),
             TensorSpec("attention_mask", "int64", ("batch", "sequence")))
    ranges = hf_config_ranges(Cfg(), [s.name for s in specs])
    assert ranges == {"input_ids": (0, 119), "token_type_ids": (0, 1), "attention_mask": (1, 1)}
    given = (TensorSpec("input_ids", "int64", ("batch", "sequence"), (0, 50)),)
    out = {s.name: s.value_range for s in prefer(specs, ranges, given)}
    assert out == {"input_ids": (0, 50), "token_type_ids": (0, 1), "attention_mask": (1, 1)}
