"""Hugging Face folders that retool cannot convert faithfully are refused with one line (issue 23):
encoder-decoders forced through another task or not exported (speech), weights that do not fit the
architecture, causal LMs without a KV cache. T5/BART themselves convert (tests/test_convert_seq2seq.py)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.torch


def _one_line(r, code: int) -> str:
    assert r.code == code, r.err
    assert "Traceback" not in r.err
    lines = [ln for ln in r.err.strip().splitlines() if ln.startswith("retool: error")]
    assert len(lines) == 1, r.err
    return lines[0]


def test_t5_feature_extraction_is_one_line_not_a_traceback(tmp_path, cli):
    from fixtures import hf_frontier

    src = hf_frontier.t5(tmp_path / "t5")
    out = tmp_path / "t5.onnx"
    line = _one_line(cli("-q", "convert", src, "-o", out, "--task", "feature-extraction"), 4)
    assert "T5ForConditionalGeneration is an encoder-decoder" in line and "decoder inputs" in line
    assert "without --task" in line and "T5EncoderModel" in line and not out.exists()


def test_speech_encoder_decoder_refused_before_loading(tmp_path, cli):
    """An encoder-decoder retool does not export (Whisper: speech features, not tokens) is named up front."""
    src = tmp_path / "whisper"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["WhisperForConditionalGeneration"],
                                                 "model_type": "whisper", "is_encoder_decoder": True}))
    (src / "model.safetensors").write_bytes(b"")
    line = _one_line(cli("-q", "convert", src, "-o", tmp_path / "w.onnx"), 4)
    assert "WhisperForConditionalGeneration is an encoder-decoder" in line and "not model_type 'whisper'" in line
    assert "t5, mt5, bart, mbart, marian" in line and "optimum-cli" in line
    line = _one_line(cli("-q", "convert", src, "-o", tmp_path / "w.onnx", "--task", "text2text-generation"), 4)
    assert "--task text2text-generation is for the encoder-decoders" in line


@pytest.mark.slow
def test_t5_encoder_advice_converts(tmp_path, cli):
    """The advice in the refusal works: the encoder saved on its own converts."""
    from transformers import T5EncoderModel

    from fixtures import hf_frontier

    src = hf_frontier.t5(tmp_path / "t5")
    enc = tmp_path / "t5-encoder"
    T5EncoderModel.from_pretrained(str(src)).save_pretrained(str(enc))
    r = cli("convert", enc, "-o", tmp_path / "enc.onnx", "--json")
    assert r.code == 0, r.err
    assert [o["name"] for o in json.loads(r.out)["artifact"]["outputs"]] == ["last_hidden_state"]


@pytest.mark.slow
def test_bart_without_task_converts(tmp_path, cli):
    """Once refused (issue 23): an encoder-decoder folder now converts to an encoder and a decoder."""
    from fixtures import hf_frontier

    out = tmp_path / "b.onnx"
    r = cli("convert", hf_frontier.bart(tmp_path / "bart"), "-o", out)
    assert r.code == 0, r.err
    assert "and beside it b.encoder.onnx, b.seq2seq.json" in r.out
    art = json.loads((tmp_path / "b.report.json").read_text())["artifact"]
    assert art["extra_files"] == ["b.encoder.onnx", "b.seq2seq.json"]
    assert (tmp_path / "b.encoder.onnx").is_file() and (tmp_path / "b.seq2seq.json").is_file()
    assert [o["name"] for o in art["outputs"]][:2] == ["logits", "present.0.decoder.key"]


def test_gpt2_weights_under_a_llama_config_refused(tmp_path, cli):
    from fixtures import hf_frontier, hf_models

    llama = hf_models.random_decoder(tmp_path / "llama", "llama")
    gpt2 = hf_models.random_decoder(tmp_path / "gpt2", "gpt2")
    mixed = hf_frontier.foreign_weights(tmp_path / "mixed", config_from=llama, weights_from=gpt2)
    out = tmp_path / "m.onnx"
    line = _one_line(cli("-q", "convert", mixed, "-o", out), 4)
    assert "do not fit LlamaForCausalLM" in line and "model.safetensors" in line
    assert "21 missing (lm_head.weight, model.embed_tokens.weight" in line
    assert "28 unexpected (transformer.h.0.attn.c_attn.bias" in line
    assert not out.exists() and not out.with_suffix(".onnx.report.json").exists()


def test_bart_forced_through_text_generation_refused(tmp_path, cli):
    """BartForCausalLM loads only the decoder: the encoder's weights are unexpected, lm_head is missing."""
    from fixtures import hf_frontier

    src = hf_frontier.bart(tmp_path / "bart")
    line = _one_line(cli("-q", "convert", src, "-o", tmp_path / "b.onnx", "--task", "text-generation"), 4)
    assert "BartForCausalLM" in line and "lm_head.weight" in line
    assert "37 unexpected" in line and "model.encoder." in line


def test_encoder_with_another_encoders_weights_refused(tmp_path, cli):
    from fixtures import hf_frontier, hf_models

    bert = hf_models.bert(tmp_path / "bert")
    distil = hf_models.distilbert(tmp_path / "distil")
    mixed = hf_frontier.foreign_weights(tmp_path / "mixed", config_from=bert, weights_from=distil)
    line = _one_line(cli("-q", "convert", mixed, "-o", tmp_path / "m.onnx"), 4)
    assert "do not fit BertModel (feature-extraction)" in line and "missing (" in line and "unexpected (" in line


def test_classifier_head_dropped_on_purpose_is_not_refused(tmp_path, cli):
    """--task feature-extraction on a classifier folder leaves the head out: its weights are unexpected, by choice."""
    from fixtures import hf_models

    src = hf_models.bert(tmp_path / "cls", classify=True)
    assert cli("-q", "convert", src, "-o", tmp_path / "fe.onnx", "--task", "feature-extraction").code == 0
    # the other way round is not: a base folder under a head class has no trained head
    line = _one_line(cli("-q", "convert", hf_models.bert(tmp_path / "base"), "-o", tmp_path / "c.onnx",
                         "--task", "sequence-classification"), 4)
    assert "missing (classifier.bias, classifier.weight)" in line


def test_decoder_without_kv_cache_refused(tmp_path, cli):
    from fixtures import hf_frontier

    src = hf_frontier.mamba(tmp_path / "mamba")
    out = tmp_path / "mamba.onnx"
    line = _one_line(cli("-q", "convert", src, "-o", out), 4)
    assert "MambaForCausalLM" in line and "not a key/value cache" in line and not out.exists()
