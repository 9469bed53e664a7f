"""bench's onnxruntime-genai peer (bench/peer_genai.py): skipped with its reason when the extra is absent,
the tokenizer the builder needs, an unsupported family skipped with the builder's reason, and a
small real run (builder int4 in genai's runtime and in retool's loop, beside retool's int4 / fp32)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bench_peers_openvino import BLOCKER  # noqa: E402

PROBE = BLOCKER + """
import json
from pathlib import Path
from bench import peer_genai

print(json.dumps(peer_genai.compare(Path("no-folder"), Path("a.onnx"), Path("b.onnx"), Path({tmp!r}), True)))
"""


def test_genai_peer_is_skipped_with_its_reason_when_the_extra_is_absent(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(hide=["onnxruntime_genai"], tmp=str(tmp_path))],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["status"] == "skipped"
    assert "onnxruntime-genai is not installed" in got["reason"] and "'.[bench]'" in got["reason"]
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("transformers")
    from fixtures import hf_models

    return hf_models.random_decoder(tmp_path_factory.mktemp("genai") / "llama", "llama")


def test_builder_input_has_a_tokenizer_over_the_models_vocabulary(llama, tmp_path):
    from transformers import AutoTokenizer

    from bench.peer_genai import builder_input

    src = builder_input(llama, tmp_path / "in")
    tok = AutoTokenizer.from_pretrained(str(src))
    cfg = json.loads((llama / "config.json").read_text())
    assert len(tok) == cfg["vocab_size"]
    assert tok.convert_tokens_to_ids(["t5", f"t{cfg['vocab_size'] - 1}"]) == [5, cfg["vocab_size"] - 1]
    assert tok.eos_token_id == cfg["eos_token_id"]
    assert (src / "config.json").resolve() == (llama / "config.json").resolve()  # the model's files, linked
    assert not (llama / "tokenizer.json").exists()  # the fixture folder is left as it was


def test_builder_skips_a_family_it_does_not_support(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("transformers")
    from bench.peer_genai import build, unsupported
    from fixtures import hf_models

    got = build(hf_models.random_decoder(tmp_path / "gpt2", "gpt2"), tmp_path / "out")
    assert got["status"] == "skipped" and "does not support GPT2LMHeadModel" in got["reason"], got
    assert not (tmp_path / "out").exists()
    assert unsupported(hf_models.random_decoder(tmp_path / "llama", "llama")) is None


@pytest.mark.slow
def test_genai_peer_times_the_builder_model_beside_retools(tmp_path, tmp_path_factory):
    pytest.importorskip("onnxruntime_genai")
    from bench import peer_genai
    from fixtures import hf_models
    from retool.optimizers import weight_only

    # trained, so greedy tokens have margins and agreement means something (random weights tie)
    folder, fp32, _ = hf_models.converted_decoder(tmp_path_factory, "llama")
    int4 = tmp_path / "int4.onnx"
    weight_only.quantize(fp32, int4, bits=4)
    got = peer_genai.compare(folder, fp32, int4, tmp_path / "work", quick=True)
    assert got["status"] == "ok", got
    assert set(got["variants"]) == {peer_genai.GENAI, peer_genai.BUILDER_LOOP, peer_genai.RETOOL_INT4,
                                    peer_genai.RETOOL_FP32}
    # the same model in genai's runtime and in retool's loop picks the same greedy tokens
    same, n = got["genai_tokens_agree_with_loop"].split("/")
    assert same == n and int(n) >= 1, got["genai_tokens_agree_with_loop"]  # up to the first eos
    assert got["graphs"]["builder int4"]["MatMulNBits"] > 0 and got["graphs"]["retool int4"]["MatMulNBits"] > 0
    assert got["graphs"]["builder int4"].get("GroupQueryAttention", 0) > 0
    assert got["goal_retool_int4_vs_builder_at_loop"]["outcome"] in ("pass", "fail", "undecided")
    assert got["prefill_logits_vs_fp32"]["retool int4"]["cosine"] > 0.99  # retool int4 keeps the function
    assert isinstance(got["builder_model_comparable"], bool)
    assert all(v["ms_per_token"]["n"] == got["rounds"] >= 5 for v in got["variants"].values())
    assert "| builder int4 @ genai |" in "\n".join(peer_genai.render("llama", got))
