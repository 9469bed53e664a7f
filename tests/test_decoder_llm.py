"""Decoder LLMs with a KV cache (issue 16): export names and dims, generation parity, weight-only int4/int8.

The fixtures are tiny Llama and GPT-2 models built from configs and briefly trained on a synthetic
rule (fixtures/hf_models.py), once per test session. The torch reference here is transformers'
own ``generate``; the ORT loop is written out in the test, independent of retool's.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")
pytestmark = [pytest.mark.torch, pytest.mark.slow]

FAMILIES = ("llama", "gpt2")


@pytest.fixture(scope="session")
def decoders(tmp_path_factory):
    """family -> (trained HF folder, its fp32 ONNX, the convert report)."""
    from fixtures import hf_models

    return {fam: hf_models.converted_decoder(tmp_path_factory, fam) for fam in FAMILIES}


def _dims(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


@pytest.mark.parametrize("fam", FAMILIES)
def test_exported_names_and_dims(decoders, fam):
    _, path, report = decoders[fam]
    m = onnx.load(str(path))
    ins = {i.name: _dims(i) for i in m.graph.input}
    outs = {o.name: _dims(o) for o in m.graph.output}
    heads = 2 if fam == "llama" else 4  # Llama fixture uses grouped-query attention
    assert list(ins)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert ins["input_ids"] == ["batch", "sequence"] and ins["position_ids"] == ["batch", "sequence"]
    assert ins["attention_mask"] == ["batch", "total_sequence"]
    assert list(ins)[3:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert ins["past_key_values.1.value"] == ["batch", heads, "past_sequence", 16]
    assert list(outs) == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert outs["logits"] == ["batch", "sequence", 64]
    assert outs["present.0.key"] == ["batch", heads, "total_sequence", 16]
    assert m.opset_import[0].version >= 18
    assert report.data["task"] == "text-generation"


def _ort_greedy(path, prompt, n_new):
    """A plain greedy loop over the exported graph with its cache."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past_in = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    feeds = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past_in}
    ids, tokens, steps = prompt, [], []
    total = prompt.shape[1]
    pos = np.arange(total, dtype=np.int64)[None]
    for _ in range(n_new):
        outs = sess.run(None, {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                               "position_ids": pos, **feeds})
        logits = outs[0][:, -1]
        steps.append(logits[0])
        nxt = int(logits.argmax(-1)[0])
        tokens.append(nxt)
        feeds = {i.name: o for i, o in zip(past_in, outs[1:])}
        ids = np.array([[nxt]], np.int64)
        pos = np.array([[total]], np.int64)
        total += 1
    return tokens, np.stack(steps)


@pytest.mark.parametrize("fam", FAMILIES)
def test_fp32_generation_parity(decoders, fam):
    import torch
    from transformers import AutoModelForCausalLM

    folder, path, report = decoders[fam]
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    prompt = np.random.default_rng(11).integers(0, 64, (1, 6)).astype(np.int64)
    with torch.no_grad():
        gen = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones((1, 6), dtype=torch.long),
                             max_new_tokens=32, do_sample=False, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0)
    ref_tokens = gen.sequences[0, 6:].tolist()
    ref_scores = torch.stack(gen.scores, 1)[0].numpy()
    tokens, logits = _ort_greedy(path, prompt, 32)
    assert tokens == ref_tokens
    assert float(np.abs(logits - ref_scores).max()) < 1e-4
    # and retool's own report says the same, for each of its checks
    g = report.data["generation"]
    assert {c.name for c in report.checks} >= {"generation:greedy", "generation:prefill", "generation:batch",
                                               "generation:left_padded"}
    for name in ("greedy", "batch", "left_padded"):
        assert g[name]["agreement"] == g[name]["steps"] and g[name]["max_abs_diff"] < 1e-4
    assert g["greedy"]["min_margin"] > 0.1  # trained: a margin that quantization can be judged against
    assert len(g["greedy"]["rows"][0]["per_step"]["cosine"]) == 32


def _weight_matmuls(path):
    from retool.optimizers.weight_only import expose_weights, weight_matmuls

    m = onnx.load(str(path))
    expose_weights(m)
    return len(weight_matmuls(m))


@pytest.mark.parametrize("fam", FAMILIES)
def test_int4_passes_teacher_forced_gate(decoders, fam, tmp_path, cli):
    _, path, _ = decoders[fam]
    out = tmp_path / f"{fam}.int4.onnx"
    r = cli("optimize", path, "--target", "cpu-int4", "-o", out, "--json", "--no-measure")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    tf = rep["data"]["generation"]["teacher_forced"]
    assert tf["agreement"] >= 31 / 32 * tf["steps"] and tf["min_cosine"] >= 0.98
    m = onnx.load(str(out))
    n = sum(1 for node in m.graph.node if node.op_type == "MatMulNBits")
    assert n == _weight_matmuls(path) and n > 0
    assert out.stat().st_size < 0.7 * path.stat().st_size
    # independent: the int4 model teacher-forced on the fp32 model's greedy tokens
    ref_tokens, ref_logits = _ort_greedy(path, np.array([[3, 9, 27, 1, 50]], np.int64), 32)
    q_tokens, q_logits = _ort_greedy(out, np.array([[3, 9, 27, 1, 50]], np.int64), 32)
    assert sum(a == b for a, b in zip(ref_tokens, q_tokens)) >= 28  # free-running: a flip may cascade


def test_int8_weight_free_running(decoders, tmp_path, cli):
    _, path, _ = decoders["llama"]
    out = tmp_path / "llama.int8w.onnx"
    r = cli("optimize", path, "--target", "cpu-int8-weight", "-o", out, "--json", "--no-measure")
    assert r.code == 0, r.err
    g = json.loads(r.out)["data"]["generation"]
    assert g["free_running"]["agreement"] == g["free_running"]["steps"] and g["teacher_forced"]["min_cosine"] >= 0.999
    assert g["batch_invariance_max_abs_diff"] <= 1e-3  # MatMulNBits int8: rows independent of the batch


def test_dynamic_int8_decoder_fails_batch_invariance(decoders, tmp_path):
    """quantize_dynamic shares one activation scale per batch: a row's logits move with its neighbours."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from retool.runtime import make_session
    from retool.validators.generation import layout_from_session, make_prompts, ort_step, quantized_gate

    _, path, _ = decoders["llama"]
    quantize_dynamic(str(path), str(tmp_path / "dyn.onnx"), weight_type=QuantType.QInt8)
    ref, cand = make_session(path), make_session(tmp_path / "dyn.onnx")
    layout = layout_from_session(ref)
    checks, data = quantized_gate(ort_step(ref), ort_step(cand), layout, make_prompts(layout.vocab), 32, 0.0, 0.0, True)
    inv = next(c for c in checks if c.name == "generation:batch_invariance")
    assert not inv.passed and inv.severity == "gate" and data["batch_invariance_max_abs_diff"] > 1e-3


def test_gpt2_gemm_becomes_matmulnbits(decoders, tmp_path):
    from retool.optimizers.weight_only import quantize

    _, path, _ = decoders["gpt2"]
    fp32 = onnx.load(str(path))
    gemms = sum(1 for n in fp32.graph.node if n.op_type == "Gemm")
    assert gemms > 0  # what dynamo makes of GPT-2's Conv1D layers
    info = quantize(path, tmp_path / "g.onnx", bits=4)
    q = onnx.load(str(tmp_path / "g.onnx"))
    assert info["gemm_rewritten"] == gemms
    assert sum(1 for n in q.graph.node if n.op_type == "Gemm") == 0
    assert sum(1 for n in q.graph.node if n.op_type == "MatMulNBits") == info["weight_matmuls"] == gemms + 1


def test_broken_quantization_fails_loudly(decoders, tmp_path, monkeypatch):
    """Without the Gemm rewrite the quantizer silently skips GPT-2's layers; retool must refuse the result."""
    from retool.errors import OptimizationError
    from retool.optimizers import weight_only

    _, path, _ = decoders["gpt2"]
    monkeypatch.setattr(weight_only, "expose_weights", lambda model: {"gemm_rewritten": 0,
                                                                      "transposed_weights_folded": 0})
    # with the rewrite off, count the Gemms as the weight products they are
    real_count = weight_only.weight_matmuls
    monkeypatch.setattr(weight_only, "weight_matmuls", lambda m: real_count(m) + [
        n.name for n in m.graph.node if n.op_type == "Gemm"])
    with pytest.raises(OptimizationError, match=r"only 1 of 9 weight MatMuls became MatMulNBits"):
        weight_only.quantize(path, tmp_path / "broken.onnx", bits=4)


def test_decoder_custom_code_refused_and_no_weights(tmp_path, cli):
    from fixtures import hf_models

    folder = hf_models.random_decoder(tmp_path / "lm", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MyLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_mine.py").write_text("raise SystemExit('must not run')\n")
    r = cli("-q", "convert", folder, "-o", tmp_path / "lm.onnx")
    assert r.code == 2 and "--trust-remote-code" in r.err and len(r.err.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    r = cli("-q", "convert", empty, "-o", tmp_path / "e.onnx")
    assert r.code == 2 and "no weights" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "lm.onnx").exists() and not (tmp_path / "e.onnx").exists()


def test_publish_lists_cache_tensors_with_dynamic_dims(decoders, tmp_path, cli):
    from retool.publish.config import parse_with_triton_schema

    _, path, _ = decoders["gpt2"]
    r = cli("-q", "publish", path, "--repo", tmp_path / "repo", "--name", "lm")
    assert r.code == 0, r.err
    text = (tmp_path / "repo" / "lm" / "config.pbtxt").read_text()
    cfg = parse_with_triton_schema(text)
    assert cfg.max_batch_size == 0 and "dynamic_batching" not in text  # ragged requests: no server batching
    ins = {t.name: list(t.dims) for t in cfg.input}
    outs = {t.name: list(t.dims) for t in cfg.output}
    assert ins["input_ids"] == [-1, -1] and ins["attention_mask"] == [-1, -1] and ins["position_ids"] == [-1, -1]
    assert ins["past_key_values.1.value"] == [-1, 4, -1, 16]
    assert outs["logits"] == [-1, -1, 64] and outs["present.0.key"] == [-1, 4, -1, 16]


def test_pipeline_with_a_decoder(decoders, tmp_path, cli):
    import shutil

    from retool.types import Report

    folder, _, _ = decoders["llama"]
    shutil.copytree(folder, tmp_path / "lm")
    (tmp_path / "retool.yaml").write_text(
        "version: 1\nrepository: ./repo\nmodels:\n  - name: lm\n    source: lm/\n"
        "    options: {task: text-generation}\n    validation: {threads: 1, latency: true}\n"
        "    targets:\n      - name: cpu-int4\n        tolerance: {min_top1: 0.96875, min_cosine: 0.98}\n"
        "    publish: {when: gates-pass}\n    serve: {check: true}\n")
    r = cli("-q", "run", tmp_path / "retool.yaml", "--out", tmp_path / "out", "--json")
    assert r.code == 0, r.err
    rep = Report.load(tmp_path / "out" / "lm" / "cpu-int4" / "report" / "report.json")
    tf = rep.data["generation"]["teacher_forced"]
    assert tf["agreement"] >= 31 and {c.name for c in rep.checks} >= {"generation:teacher_forced"}
    assert rep.data["latency"]["candidate"]["1"]["p50_ms"] > 0  # one decode step
    html = (tmp_path / "out" / "lm" / "cpu-int4" / "report" / "report.html").read_text()
    assert "<h2>Generation</h2>" in html and "teacher forced" in html
    assert "**Generation, teacher forced:**" in (tmp_path / "out" / "lm" / "cpu-int4" / "report" / "report.md").read_text()
    assert (tmp_path / "repo" / "lm-cpu-int4" / "config.pbtxt").exists() or any((tmp_path / "repo").iterdir())
    # served by a real Triton: a greedy generation through it, teacher-forced against the fp32 convert output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    serve = summary["targets"][0]["stages"]["serve"]
    assert serve["status"] == "ok" and serve["check"]["passed"], serve
    gen = {g["protocol"]: g for g in serve["check"]["generation"]}
    assert set(gen) == {"http", "grpc"} and all(g["agreement"] == g["steps"] == 224 for g in gen.values())
    assert all(g["teacher_forced"]["agreement"] >= 31 / 32 * g["teacher_forced"]["steps"] for g in gen.values())
