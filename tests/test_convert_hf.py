"""Hugging Face save_pretrained folders -> ONNX (issue 14 item 8).

Parity is checked here independently of retool's report: the test runs transformers and ORT itself.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.torch


def _io(path):
    m = onnx.load(str(path), load_external_data=False)

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
    return ({i.name: dims(i) for i in m.graph.input}, {o.name: dims(o) for o in m.graph.output})


def _ort(path, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _text_feeds(vocab, batch=3, seq=11, types=True, seed=5):
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int64),
             "attention_mask": np.ones((batch, seq), np.int64)}
    feeds["attention_mask"][0, -4:] = 0
    if types:
        feeds["token_type_ids"] = rng.integers(0, 2, (batch, seq)).astype(np.int64)
    return feeds


@pytest.mark.slow
def test_bert_folder_feature_extraction(tmp_path, cli):
    import torch
    from transformers import AutoModel

    from fixtures import hf_models
    from retool.converter.core import detect_framework

    src = hf_models.bert(tmp_path / "my-bert")
    assert detect_framework(str(src)) == "hf"
    out = tmp_path / "bert.onnx"
    r = cli("convert", src, "-o", out, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["passed"] and report["data"]["framework"] == "hf"
    ins, outs = _io(out)
    assert ins == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                   "token_type_ids": ["batch", "sequence"]}
    assert list(outs) == ["last_hidden_state", "pooler_output"]
    assert outs["last_hidden_state"] == ["batch", "sequence", 32]
    feeds = _text_feeds(120)  # batch 3, sequence 11: neither size was used at export
    model = AutoModel.from_pretrained(str(src)).eval()
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    got = _ort(out, feeds)
    np.testing.assert_allclose(got[0], ref.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(got[1], ref.pooler_output.numpy(), atol=1e-4)


def test_distilbert_classifier_task_from_architectures_and_user_axis_names(tmp_path, cli):
    import torch
    from transformers import AutoModelForSequenceClassification

    from fixtures import hf_models

    src = hf_models.distilbert(tmp_path / "distil")
    out = tmp_path / "d.onnx"
    r = cli("convert", src, "-o", out, "--input", "input_ids:int64:n,tokens", "--input", "attention_mask:int64:n,tokens")
    assert r.code == 0, r.err
    ins, outs = _io(out)
    assert ins == {"input_ids": ["n", "tokens"], "attention_mask": ["n", "tokens"]}
    assert outs == {"logits": ["n", 2]}
    feeds = _text_feeds(120, types=False, seq=13)
    model = AutoModelForSequenceClassification.from_pretrained(str(src)).eval()
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    np.testing.assert_allclose(_ort(out, feeds)[0], ref, atol=1e-4)


def test_vit_image_classification(tmp_path, cli):
    import torch
    from transformers import AutoModelForImageClassification

    from fixtures import hf_models

    src = hf_models.vit(tmp_path / "vit")
    out = tmp_path / "v.onnx"
    r = cli("convert", src, "-o", out)
    assert r.code == 0, r.err
    ins, outs = _io(out)
    assert ins == {"pixel_values": ["batch", 3, 32, 32]} and list(outs) == ["logits"]
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    model = AutoModelForImageClassification.from_pretrained(str(src)).eval()
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(_ort(out, {"pixel_values": x})[0], ref, atol=1e-4)


def test_task_flag_overrides_architectures(tmp_path, cli):
    from fixtures import hf_models

    src = hf_models.bert(tmp_path / "cls", classify=True)
    out = tmp_path / "fe.onnx"
    assert cli("convert", src, "-o", out, "--task", "feature-extraction").code == 0
    assert list(_io(out)[1]) == ["last_hidden_state", "pooler_output"]
    r = cli("convert", src, "-o", tmp_path / "x.onnx", "--task", "fill-mask")
    assert r.code == 2 and "--task 'fill-mask'" in r.err


def test_custom_code_refused_without_trust(tmp_path, cli):
    from fixtures import hf_models

    src = hf_models.bert(tmp_path / "custom")
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "c.onnx"
    r = cli("-q", "convert", src, "-o", out)
    assert r.code == 2
    assert "--trust-remote-code" in r.err and "auto_map" in r.err and len(r.err.strip().splitlines()) == 1
    assert not out.exists()


def test_folder_without_weights_one_line(tmp_path, cli):
    from fixtures import hf_models

    src = hf_models.bert(tmp_path / "noweights")
    (src / "model.safetensors").unlink()
    out = tmp_path / "n.onnx"
    r = cli("-q", "convert", src, "-o", out)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1
    assert "no weights" in r.err and "save_pretrained" in r.err and "Traceback" not in r.err
    assert not out.exists()


def test_pickled_weights_need_trust(tmp_path, cli):
    import torch
    from safetensors.torch import load_file

    from fixtures import hf_models

    src = hf_models.bert(tmp_path / "pickled")
    state = load_file(str(src / "model.safetensors"))
    torch.save(state, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    r = cli("convert", src, "-o", tmp_path / "p.onnx")
    assert r.code == 2 and "pytorch_model.bin" in r.err and "--trust-remote-code" in r.err
    r = cli("convert", src, "-o", tmp_path / "p.onnx", "--trust-remote-code")
    assert r.code == 0, r.err


def test_unknown_architecture_asks_for_task(tmp_path, cli):
    from fixtures import hf_models

    src = hf_models.bert(tmp_path / "odd")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["BertForSomethingNew"]
    (src / "config.json").write_text(json.dumps(cfg))
    r = cli("convert", src, "-o", tmp_path / "o.onnx")
    assert r.code == 4 and "--task" in r.err and "BertForSomethingNew" in r.err
