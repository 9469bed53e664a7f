"""Integer inputs: safe random ranges from the model, ranges in --input, index-error hints,
the dims used per dynamic axis, and the user's axis names kept in the ONNX file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from retool.inputs import random_feeds
from retool.types import TensorSpec

torch = pytest.importorskip("torch")


def test_a_range_in_input_is_parsed_kept_and_used():
    s = TensorSpec.parse("ids:int64:batch,seq:0..30521")
    assert s.shape == ("batch", "seq") and s.value_range == (0, 30521)
    assert TensorSpec.from_dict(s.to_dict()) == s and str(s) == "ids:int64:batch,seq:0..30521"
    feeds = random_feeds([TensorSpec.parse("ids:int64:batch,seq:100..102")], batch=4)
    assert feeds["ids"].min() >= 100 and feeds["ids"].max() <= 102
    with pytest.raises(ValueError, match="integer inputs"):
        TensorSpec.parse("x:float32:batch:0..3")


def test_an_embedding_smaller_than_the_default_range_converts_with_the_users_axis_name(tmp_path, cli):
    out = tmp_path / "emb.onnx"
    r = cli("convert", "fixtures.torch_int_models:tiny_embedding", "--input", "ids:int64:batch,seq", "-o", out)
    assert r.code == 0, r.err  # Embedding(5): ids 0..7 used to fail with IndexError
    import onnx

    m = onnx.load(str(out))
    assert [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    rep = json.loads((tmp_path / "emb.report.json").read_text())
    assert rep["artifact"]["inputs"][0]["range"] == [0, 4]
    assert rep["data"]["dynamic_dims"] == {"batch": [1, 4], "seq": 7}
    # the ONNX graph alone says the range too (the Gather table size), for validate and optimize
    from retool.input_ranges import ranges_from_graph

    assert ranges_from_graph(m) == {"ids": (0, 4)}
    (tmp_path / "emb.report.json").unlink()
    r = cli("validate", out, "--json")
    d = json.loads(r.out)["data"]
    assert r.code == 0 and d["candidate"]["inputs"][0]["range"] == [0, 4]
    assert d["dynamic_dims"] == {"batch": [1, 4], "seq": 7}


def test_an_index_error_names_the_random_inputs_and_the_fix(tmp_path, cli):
    r = cli("convert", "fixtures.torch_int_models:tiny_embedding", "--input", "ids:int64:batch,seq:0..50",
            "-o", tmp_path / "e.onnx")
    assert r.code == 4
    line = r.err.strip().splitlines()[-1]
    assert "probably the random integer inputs" in line and "--example-inputs" in line and "0..50" in line


def test_hf_style_config_vocab_size_bounds_the_ids():
    from fixtures.torch_int_models import with_config
    from retool.input_ranges import source_high

    assert source_high(with_config()) == 29  # config.vocab_size 30 < its 40-row table
    assert source_high(torch.nn.Linear(2, 2)) is None


def test_example_inputs_get_no_hint():
    from retool.input_ranges import index_hint

    spec = [TensorSpec.parse("ids:int64:batch,6")]
    assert "random integer inputs" in index_hint("IndexError: index out of range in self", spec)
    assert index_hint("IndexError: index out of range in self", spec, examples={"ids": np.zeros(1)}) == ""
    assert index_hint("shape mismatch", spec) == ""


def test_the_index_hint_names_every_random_integer_input():
    from retool.input_ranges import index_hint
    from retool.types import TensorSpec

    specs = (TensorSpec("input_ids", "int64", ("batch", "seq"), value_range=(0, 99)),
             TensorSpec("token_type_ids", "int64", ("batch", "seq")), TensorSpec("x", "float32", (1,)))
    hint = index_hint("IndexError: index out of range in self", specs)
    assert "input_ids got values 0..99" in hint and "token_type_ids got values 0.." in hint and "x got" not in hint
    assert index_hint("IndexError: index out of range", specs, examples={"input_ids": None}) == ""
