"""The torch dynamo exporter's attention rewritten into com.microsoft.Attention: fused op counts, parity, int8.

ORT's own attention fusion does not match the dynamo graph; these tests fail when the rewrite
silently stops applying (a transformers or torch.onnx upgrade that changes the decomposition)."""
from __future__ import annotations

import numpy as np
import pytest

FUSED_COUNTED = ("Attention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "Softmax", "QAttention")


@pytest.fixture(scope="session")
def hf_bert_onnx(tmp_path_factory):
    """A tiny BertModel (2 layers, hidden 32, 4 heads, seeded) exported as retool convert does."""
    pytest.importorskip("transformers")
    from fixtures import hf_models
    from retool.converter.core import convert

    d = tmp_path_factory.mktemp("hf_bert")
    art, _ = convert(hf_models.bert(d / "bert"), d / "bert.onnx")
    return art.path


@pytest.fixture(scope="session")
def hf_bert_fused(hf_bert_onnx, tmp_path_factory):
    from retool.optimizers.transformer import detect_encoder, fuse

    notes: dict = {}
    dst = tmp_path_factory.mktemp("hf_bert_fused") / "fused.onnx"
    stats = fuse(hf_bert_onnx, dst, detect_encoder(hf_bert_onnx), notes)
    return dst, stats, notes


def _text_feeds(seed: int, batch: int = 3, seq: int = 13, vocab: int = 120) -> dict:
    """Fresh inputs with right padding (never the rewrite's own proof inputs)."""
    rng = np.random.default_rng(1000 + seed)
    lengths = rng.integers(seq // 2, seq + 1, size=batch)
    lengths[0] = seq - 4
    return {"input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int64),
            "attention_mask": (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64),
            "token_type_ids": rng.integers(0, 2, (batch, seq)).astype(np.int64)}


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _outputs(path, feeds):
    from retool.runtime import make_session, run_session

    return run_session(make_session(path, threads=1), feeds)


def test_dynamo_bert_attention_fuses(hf_bert_fused):
    from retool.optimizers.transformer import op_counts

    dst, stats, notes = hf_bert_fused
    assert notes["attention_blocks"] == 2 and not notes["skipped"], notes
    ops = op_counts(dst, FUSED_COUNTED)
    assert ops.get("Attention") == 2 and not ops.get("Softmax"), ops
    assert ops.get("SkipLayerNormalization", 0) >= 3, ops  # the residual Adds after attention and FFN (not the first)
    assert ops.get("BiasGelu", 0) + ops.get("FastGelu", 0) == 2, ops
    assert stats.get("Attention") == 2


def test_fused_bert_keeps_parity_on_padded_inputs(hf_bert_onnx, hf_bert_fused):
    dst = hf_bert_fused[0]
    for seed in range(3):
        feeds = _text_feeds(seed, seq=9 + 4 * seed)
        ref, got = _outputs(hf_bert_onnx, feeds), _outputs(dst, feeds)
        assert len(ref) == len(got) == 2  # last_hidden_state, pooler_output
        for r, g in zip(ref, got):
            assert r.shape == g.shape
            assert _cos(r, g) >= 0.99999
            np.testing.assert_allclose(g, r, atol=2e-4, rtol=1e-3)


def test_rewrite_leaves_a_block_it_cannot_prove(hf_bert_onnx):
    """A block whose mask is not a padding mask of a graph input is left as it was, with the reason."""
    import onnx

    from retool.optimizers.attention_rewrite import find_blocks, rewrite

    m = onnx.load(str(hf_bert_onnx))
    blocks, skipped = find_blocks(m)
    assert len(blocks) == 2 and not skipped
    # feed the first block's additive mask from a new float input: no padding mask to give Attention
    mask = blocks[0].mask
    m.graph.input.append(onnx.helper.make_tensor_value_info("extra_bias", onnx.TensorProto.FLOAT, None))
    first = next(n for n in m.graph.node if n.op_type == "Add" and mask in n.input)  # the blocks share it
    first.input[list(first.input).index(mask)] = "extra_bias"
    res = rewrite(m)
    assert len(res.rewritten) == 1 and "padding mask" in next(iter(res.skipped.values()))


def test_torch_transformer_encoder_layer_fuses(transformer_onnx, tmp_path):
    """nn.TransformerEncoderLayer (packed in_proj, seq-first inside) becomes Attention too."""
    import onnx

    from retool.inputs import random_feeds
    from retool.onnx_info import artifact_from_onnx
    from retool.optimizers.transformer import detect_encoder, fuse, op_counts

    notes: dict = {}
    dst = tmp_path / "fused.onnx"
    fuse(transformer_onnx, dst, detect_encoder(transformer_onnx), notes)
    assert notes["attention_blocks"] == 2, notes
    assert op_counts(dst, FUSED_COUNTED).get("Attention") == 2
    # no mask here: input 3 is present and empty (ORT's EmbedLayerNormalization fusion indexes it)
    assert all(len(n.input) >= 4 and n.input[3] == "" for n in onnx.load(str(dst)).graph.node
               if n.op_type == "Attention")
    specs = artifact_from_onnx(transformer_onnx).inputs
    for seed in range(2):
        feeds = random_feeds(specs, batch=2, seed=50 + seed, sizes={"seq": 11})
        feeds["tokens"] %= 64
        r, g = _outputs(transformer_onnx, feeds)[0], _outputs(dst, feeds)[0]
        assert _cos(r, g) >= 0.99999


def test_dynamic_int8_of_the_fused_bert_is_qattention_and_passes(hf_bert_onnx, tmp_path):

    from retool.optimizers.core import optimize

    _, rep = optimize(hf_bert_onnx, tmp_path / "q.onnx", target="cpu-int8-dynamic", measure=False, threads=1)
    tr = rep.data["transformer"]
    assert tr["attention_rewrite"]["attention_blocks"] == 2
    assert set(tr["fused_int8"]) == {"fused", "fused-layernorm"}
    for key, built in tr["fused_int8"].items():
        assert built["passed"], (key, tr)  # the target's own int8 tolerance on held-out samples
        ops, kept = built["ops"], [n for n in built["kept_float"] if n.startswith("Attention.")]
        assert ops.get("QAttention") == 2 - len(kept) and ops.get("Attention", 0) == len(kept), (key, ops, kept)
        assert ops.get("QAttention") and not ops.get("Softmax"), (key, ops)  # the accuracy fallback kept some int8
    assert tr["fused_int8"]["fused"]["ops"].get("SkipLayerNormalization", 0) >= 3
    assert not tr["fused_int8"]["fused-layernorm"]["ops"].get("SkipLayerNormalization")


def test_skip_layer_norm_expansion_keeps_outputs(hf_bert_onnx, hf_bert_fused, tmp_path):
    from retool.optimizers.transformer import expand_skip_layer_norm, op_counts

    dst = tmp_path / "expanded.onnx"
    n = expand_skip_layer_norm(hf_bert_fused[0], dst)
    assert n == op_counts(hf_bert_fused[0])["SkipLayerNormalization"] and "SkipLayerNormalization" not in op_counts(dst)
    feeds = _text_feeds(7)
    for r, g in zip(_outputs(hf_bert_onnx, feeds), _outputs(dst, feeds)):
        np.testing.assert_allclose(g, r, atol=2e-4, rtol=1e-3)


@pytest.mark.slow
def test_vit_attention_fuses(tmp_path):
    """ViT's exported mask is built from shapes alone and is all zeros: the blocks fuse with no mask."""
    pytest.importorskip("transformers")
    from fixtures import hf_models
    from retool.converter.core import convert
    from retool.optimizers.transformer import detect_encoder, fuse, op_counts

    art, _ = convert(hf_models.vit(tmp_path / "vit"), tmp_path / "vit.onnx")
    notes: dict = {}
    dst = tmp_path / "fused.onnx"
    fuse(art.path, dst, detect_encoder(art.path), notes)
    assert notes["attention_blocks"] == 2 and not notes["skipped"], notes
    assert op_counts(dst, FUSED_COUNTED).get("Attention") == 2
    x = {"pixel_values": np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    assert _cos(_outputs(art.path, x)[0], _outputs(dst, x)[0]) >= 0.99999
