"""A transformers PreTrainedModel pickled with ``return_dict=False`` keeps its HF output names
(``last_hidden_state``, ``pooler_output``) instead of output_0/output_1, and the report says where the
names came from (issue 23)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = [pytest.mark.torch, pytest.mark.slow]


def test_pickled_bert_with_return_dict_false_keeps_hf_names(tmp_path, cli):
    from transformers import BertModel

    from fixtures import hf_models

    model = BertModel.from_pretrained(str(hf_models.bert(tmp_path / "bert", seed=1))).eval()
    model.config.return_dict = False
    src = tmp_path / "bert.pt"
    torch.save(model, src)
    out = tmp_path / "bert.onnx"
    r = cli("convert", src, "-o", out, "--trust-remote-code", "--input", "input_ids:int64:batch,sequence",
            "--input", "attention_mask:int64:batch,sequence", "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert [o["name"] for o in rep["artifact"]["outputs"]] == ["last_hidden_state", "pooler_output"]
    assert rep["data"]["output_names_source"] == "transformers ModelOutput (return_dict=True)"
    import onnxruntime as ort

    rng = np.random.default_rng(2)
    feeds = {"input_ids": rng.integers(0, 120, (3, 7)).astype(np.int64), "attention_mask": np.ones((3, 7), np.int64)}
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["last_hidden_state"], feeds)[0]
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
