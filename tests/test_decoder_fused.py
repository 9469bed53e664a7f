"""Decoder fusion (issue 24 item 4): the exported graph rewritten to onnxruntime's fused CPU contrib ops
(optimizers/decoder_fusion.py) keeps generation parity, and the node counts prove each fusion happened.

The convert check judges the fused graph against torch (greedy 32/32, prefill, batch of 2, left padding);
here an independent loop also decodes a left-padded batch with the fused and the unfused export of the same
folder and compares them row by row. The fixtures are the trained tiny decoders of fixtures/hf_models.py
(2 layers, 4 query heads, 2 key/value heads, head size 16), converted once per session.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")
pytestmark = [pytest.mark.torch, pytest.mark.slow]

from fixtures import hf_models  # noqa: E402

LAYERS = 2
_BUILT: dict = {}


def _family(tmp_path_factory, fam):
    """(folder, fused onnx, its convert report, unfused onnx) of a trained fixture, once per session."""
    if fam not in _BUILT:
        from retool.converter.core import convert

        if fam == "llama":  # shared with tests/test_decoder_llm.py (the same default convert)
            folder, fused, report = hf_models.converted_decoder(tmp_path_factory, "llama")
            d = tmp_path_factory.mktemp("fused-llama")
        else:
            d = tmp_path_factory.mktemp(f"fused-{fam}")
            folder = hf_models.trained_decoder(tmp_path_factory, fam, steps=100)  # as the family sweep's
            fused = d / f"{fam}.onnx"
            _, report = convert(str(folder), fused)
        unfused = d / f"{fam}.unfused.onnx"
        convert(str(folder), unfused, options={"fuse": False})
        _BUILT[fam] = (folder, fused, report, unfused)
    return _BUILT[fam]


def _ops(path) -> dict:
    ops: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def _left_padded_greedy(path, ids, mask, n_new):
    """A greedy loop over a graph with its cache, rows left-padded (written out here, not retool's)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past_in = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    b = ids.shape[0]
    feeds = {i.name: np.zeros((b, i.shape[1], 0, i.shape[3]), np.float32) for i in past_in}
    tokens, steps, cur = [], [], ids
    for _ in range(n_new):
        pos = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)[:, -cur.shape[1]:].astype(np.int64)
        outs = sess.run(None, {"input_ids": cur, "attention_mask": mask, "position_ids": pos, **feeds})
        steps.append(outs[0][:, -1])
        cur = outs[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens.append(cur[:, 0])
        feeds = {i.name: o for i, o in zip(past_in, outs[1:])}
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)
    return np.stack(tokens, 1), np.stack(steps, 1), outs[1:]


def _assert_parity(report):
    checks = {c.name: c for c in report.checks}
    for name in ("generation:greedy", "generation:prefill", "generation:batch", "generation:left_padded"):
        assert checks[name].passed, (name, checks[name])
    g = report.data["generation"]
    for name in ("greedy", "batch", "left_padded"):
        assert g[name]["agreement"] == g[name]["steps"] and g[name]["max_abs_diff"] < 1e-4, (name, g[name])


@pytest.mark.parametrize("fam", ["llama", "qwen2", "phi3"])
def test_fused_decoder_keeps_parity_and_fuses(tmp_path_factory, fam):
    _, fused, report, unfused = _family(tmp_path_factory, fam)
    _assert_parity(report)  # the fused graph against torch: 32/32 greedy, prefill, batch of 2, left padding
    info = report.data["fusion"]
    assert info["applied"] and info["attention_layers"] == LAYERS and not info["skipped"], info
    f, u = _ops(fused), _ops(unfused)
    print(f"{fam}: {sum(u.values())} -> {sum(f.values())} nodes; fused {info['fused_ops']}")
    # each fusion, counted: a pass that silently does not apply fails here
    assert f.get("GroupQueryAttention") == LAYERS and "Softmax" not in f
    assert f.get("RotaryEmbedding") == 2 * LAYERS and "Cos" not in f and "Neg" not in f
    # every RMSNorm, the residual Add before it included (the first one's x + x, see decoder_fusion)
    assert f.get("SkipSimplifiedLayerNormalization") == 2 * LAYERS + 1 and "ReduceMean" not in f
    assert "SimplifiedLayerNormalization" not in f  # ORT's ONNX-domain op the ONNX checker rejects
    # Q/K/V and gate/up: one MatMul each, then a Split; per layer qkv, o, gate_up, down, plus the head
    # gone per layer: the two attention MatMuls, and (not Phi-3) 7 projections became 4
    assert f["MatMul"] == 4 * LAYERS + 1 and u["MatMul"] - f["MatMul"] == (2 if fam == "phi3" else 5) * LAYERS
    # retool merged Q/K/V and gate/up (a Split each); Phi-3 has them merged already (Slices, its gate/up chunk)
    assert f.get("Split") == (LAYERS if fam == "phi3" else 2 * LAYERS)
    assert sum(f.values()) < 0.5 * sum(u.values())
    assert {i.name for i in onnx.load(str(fused)).graph.input} == {i.name for i in onnx.load(str(unfused)).graph.input}


@pytest.mark.parametrize("fam", ["llama", "qwen2", "phi3"])
def test_fused_equals_unfused_left_padded(tmp_path_factory, fam):
    """Independent of retool's check: a left-padded batch decoded by both graphs, row by row, cache included."""
    _, fused, _, unfused = _family(tmp_path_factory, fam)
    rng = np.random.default_rng(3)
    ids = np.zeros((2, 9), np.int64)
    mask = np.zeros((2, 9), np.int64)
    ids[0], mask[0] = rng.integers(1, 64, 9), 1
    ids[1, 6:], mask[1, 6:] = rng.integers(1, 64, 3), 1
    t_f, l_f, p_f = _left_padded_greedy(fused, ids, mask, 24)
    t_u, l_u, p_u = _left_padded_greedy(unfused, ids, mask, 24)
    np.testing.assert_array_equal(t_f, t_u)
    assert float(np.abs(l_f - l_u).max()) < 1e-4
    # present.* keeps its contract: (batch, kv heads, past + new, head size), the same values at real positions
    assert p_f[0].shape == p_u[0].shape == (2, 2, 9 + 23, 16)
    assert float(np.abs(p_f[0][:, :, 6:] - p_u[0][:, :, 6:]).max()) < 1e-4


def test_unsupported_family_left_unfused_with_reason(tmp_path_factory):
    """A sliding-window family keeps its attention as exported, says why, and still converts with parity;
    the norms and MatMuls around it are fused."""
    from retool.converter.core import convert

    d = tmp_path_factory.mktemp("fused-mistral")
    folder = hf_models.random_decoder(d / "mistral", "mistral")
    art, report = convert(str(folder), d / "m.onnx")
    _assert_parity_random(report)
    info = report.data["fusion"]
    assert "sliding-window" in info["skipped"]["attention"] and "attention_layers" not in info
    ops = _ops(art.path)
    assert "GroupQueryAttention" not in ops and ops.get("SkipSimplifiedLayerNormalization") == 2 * LAYERS + 1
    assert any("left parts unfused" in w for w in report.warnings)


def test_a_fusion_that_changes_the_function_is_dropped(tmp_path, monkeypatch):
    """The convert's self-check: a rewrite that misreads a pattern (here: attention scaled twice) is undone,
    and the plain export is what parity judges and what is written."""
    from retool.converter.core import convert
    from retool.optimizers import decoder_fusion

    real = decoder_fusion.fuse_attention

    def wrong(g, *a, **kw):
        n = real(g, *a, **kw)
        for node in g.g.node:
            for at in node.attribute:
                if node.op_type == "GroupQueryAttention" and at.name == "scale":
                    at.f *= 2
        return n
    monkeypatch.setattr(decoder_fusion, "fuse_attention", wrong)
    folder = hf_models.random_decoder(tmp_path / "lm", "llama")
    art, report = convert(str(folder), tmp_path / "lm.onnx")
    info = report.data["fusion"]
    assert not info["applied"] and "differs from the export" in info["skipped"]["all"], info
    assert "GroupQueryAttention" not in _ops(art.path) and "Softmax" in _ops(art.path)
    assert any("decoder fusion not applied" in w for w in report.warnings)
    _assert_parity_random(report)


def _assert_parity_random(report):
    # random weights: tokens and logits still equal torch's (margins are small, the diffs are float noise)
    for name in ("generation:greedy", "generation:batch", "generation:left_padded"):
        assert next(c for c in report.checks if c.name == name).passed


def test_int4_on_fused_decoder_passes_gates(tmp_path_factory, tmp_path, cli):
    _, fused, _, _ = _family(tmp_path_factory, "llama")
    out = tmp_path / "fused.int4.onnx"
    r = cli("optimize", fused, "--target", "cpu-int4", "-o", out, "--json", "--no-measure")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    tf = rep["data"]["generation"]["teacher_forced"]
    assert tf["agreement"] >= 31 / 32 * tf["steps"] and tf["min_cosine"] >= 0.98
    ops = _ops(out)
    # the fused Q/K/V and gate/up matrices are quantized whole: one MatMulNBits per fused MatMul
    assert ops.get("MatMulNBits") == 4 * LAYERS + 1 and "MatMul" not in ops
    assert ops.get("GroupQueryAttention") == LAYERS


def test_multi_token_step_with_past_needs_batch_1(tmp_path_factory):
    """GroupQueryAttention's documented limit, which the fused graph inherits: a step of several tokens after a
    non-empty past (chunked prefill, speculative decoding) runs at batch 1 and equals the plain export; at
    batch 2 onnxruntime refuses it (docs/huggingface.md says so; this fails the day that changes)."""
    import onnxruntime as ort

    from retool.validators.generation import layout_from_session, ort_step

    _, fused, _, unfused = _family(tmp_path_factory, "llama")
    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in
                (("fused", fused), ("unfused", unfused))}
    layout = layout_from_session(sessions["fused"])
    rng = np.random.default_rng(5)
    for batch in (1, 2):
        ids, more = rng.integers(0, 64, (batch, 5)), rng.integers(0, 64, (batch, 3))
        got = {}
        for k, s in sessions.items():
            _, past = ort_step(s)(ids, np.ones_like(ids), np.arange(5)[None].repeat(batch, 0), layout.empty_past(batch))
            step = lambda s=s, past=past: ort_step(s)(more, np.ones((batch, 8), np.int64),  # noqa: E731
                                                      np.arange(5, 8)[None].repeat(batch, 0), past)[0]
            if batch == 2 and k == "fused":
                with pytest.raises(Exception, match="batch_size must be 1"):
                    step()
                continue
            got[k] = step()
        if batch == 1:
            assert float(np.abs(got["fused"] - got["unfused"]).max()) < 1e-4
