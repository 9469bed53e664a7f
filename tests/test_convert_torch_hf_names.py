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


def _feeds(seed=2):
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 120, (3, 7)).astype(np.int64), "attention_mask": np.ones((3, 7), np.int64)}


def _trace(tmp_path, model, name):
    """torch.jit.trace the model, saved and loaded back as users ship it."""
    ex = {k: torch.from_numpy(v) for k, v in _feeds(0).items()}
    traced = torch.jit.trace(model, (ex["input_ids"], ex["attention_mask"]))
    src = tmp_path / f"{name}.pt"
    torch.jit.save(traced, str(src))
    return src


def _convert(cli, src, out):
    r = cli("convert", src, "-o", out, "--input", "input_ids:int64:batch,sequence",
            "--input", "attention_mask:int64:batch,sequence", "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


@pytest.mark.parametrize("classify", [False, True])
def test_traced_transformers_model_keeps_hf_names(tmp_path, cli, classify):
    """A traced archive keeps its class's TorchScript name (__torch__.transformers...BertModel); the names are
    the fields of the ModelOutput that class's forward returns (loss left out: no labels were traced)."""
    from transformers import BertForSequenceClassification, BertModel

    from fixtures import hf_models

    cls = BertForSequenceClassification if classify else BertModel
    model = cls.from_pretrained(str(hf_models.bert(tmp_path / "bert", seed=1, classify=classify))).eval()
    model.config.return_dict = False  # a tuple, as torch.jit.trace needs
    src = _trace(tmp_path, model, "traced")
    loaded = torch.jit.load(str(src))
    from retool.converter.torch_outputs import traced_class_name

    assert traced_class_name(loaded).endswith(f"transformers.models.bert.modeling_bert.{cls.__name__}")
    rep = _convert(cli, src, tmp_path / "m.onnx")
    want = ["logits"] if classify else ["last_hidden_state", "pooler_output"]
    assert [o["name"] for o in rep["artifact"]["outputs"]] == want
    source = rep["data"]["output_names_source"]
    assert cls.__name__ in source and "traced" in source
    import onnxruntime as ort

    feeds = _feeds()
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run([want[0]], feeds)[0]
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_traced_wrapper_has_lost_the_class_and_stays_positional(tmp_path, cli):
    """Traced inside a user's wrapper, the archive's class is __torch__.<wrapper>, not a transformers model:
    nothing can say the names, so they stay positional and the report says so."""
    from transformers import BertModel

    from fixtures import hf_models

    bert = BertModel.from_pretrained(str(hf_models.bert(tmp_path / "bert", seed=1))).eval()
    bert.config.return_dict = False

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, mask):
            return self.inner(ids, mask)

    src = _trace(tmp_path, Wrapper(bert).eval(), "wrapped")
    from retool.converter.torch_outputs import traced_class_name

    assert "transformers" not in traced_class_name(torch.jit.load(str(src)))
    rep = _convert(cli, src, tmp_path / "w.onnx")
    assert [o["name"] for o in rep["artifact"]["outputs"]] == ["output_0", "output_1"]
    assert rep["data"]["output_names_source"] == "positional"
