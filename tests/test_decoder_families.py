"""Decoder families (issue 23): every family converts with ``retool convert FOLDER`` and passes generation
parity, left padding included, past the attention window for the sliding-window ones.

Each family is a tiny config (hidden 64, 2 layers, vocab 64) briefly trained on the fixtures' synthetic
rule (fixtures/hf_models.py), so greedy tokens have margins a float error cannot flip. The sliding-window
fixtures (Mistral, Gemma 2, Gemma 3) attend over 16 tokens; retool's checks decode 40. The independent
check drives transformers' own cache (sliding layers that keep window - 1 tokens) against a greedy loop
over the exported graph written out here.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytestmark = [pytest.mark.torch, pytest.mark.slow]

from fixtures import hf_models  # noqa: E402

FAMILIES = hf_models.DECODER_FAMILIES
SLIDING = hf_models.SLIDING_FAMILIES
#: Training steps of the sweep's fixtures: enough for top-1 margins far above float noise (3e-6).
STEPS = 100
NEW_TOKENS = 32

_BUILT: dict = {}


def _convert(tmp_path_factory, fam):
    """(folder, onnx path, exit code, report JSON, stderr) of ``retool convert FOLDER``, once per family."""
    if fam not in _BUILT and fam in ("llama", "gpt2"):
        # trained and converted once per process for tests/test_decoder_llm.py too (the same convert call)
        folder, path, report = hf_models.converted_decoder(tmp_path_factory, fam)
        _BUILT[fam] = (folder, path, 0, report.to_dict(), "")
    if fam not in _BUILT:
        from retool.cli import main

        d = tmp_path_factory.mktemp(f"family-{fam}")
        folder = hf_models.trained_decoder(tmp_path_factory, fam, steps=STEPS)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["-q", "convert", str(folder), "-o", str(d / f"{fam}.onnx"), "--json"])
        report = json.loads(out.getvalue()) if code == 0 else None
        _BUILT[fam] = (folder, d / f"{fam}.onnx", code, report, err.getvalue())
    return _BUILT[fam]


@pytest.mark.parametrize("fam", FAMILIES)
def test_family_converts_with_generation_parity(tmp_path_factory, fam):
    folder, path, code, report, err = _convert(tmp_path_factory, fam)
    assert code == 0, err
    checks = {c["name"]: c for c in report["checks"]}
    for name in ("generation:greedy", "generation:prefill", "generation:batch", "generation:left_padded"):
        assert checks[name]["passed"], (name, checks[name])
    g = report["data"]["generation"]
    for name in ("greedy", "batch", "left_padded"):
        assert g[name]["agreement"] == g[name]["steps"] and g[name]["max_abs_diff"] < 1e-4, (name, g[name])
    print(f"{fam}: min margin {g['greedy']['min_margin']:.4g}, max logit diff "
          f"{max(g[n]['max_abs_diff'] for n in ('greedy', 'batch', 'left_padded')):.3g}")
    assert g["greedy"]["min_margin"] > 1e-3  # trained: margins far above the logit error, so a wrong token shows
    cfg = json.loads((folder / "config.json").read_text())
    if fam in SLIDING:
        # retool's own check decodes past the window: a left-padded 8-token prompt + 32 new tokens
        assert cfg["sliding_window"] == hf_models.SLIDING_WINDOW < max(g["prompt_lengths"]) + g["new_tokens"]


def _hf_greedy(model, ids, mask, n_new):
    """transformers' model with its own cache (sliding layers keep window - 1 tokens), greedy, padded rows."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    tokens, steps = [], []
    cur = ids
    with torch.no_grad():
        for _ in range(n_new):
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -cur.shape[1]:]
            out = model(input_ids=cur, attention_mask=mask, position_ids=pos, use_cache=True, cache=cache)
            last = out.logits[:, -1].float()
            steps.append(last.numpy())
            cur = last.argmax(-1, keepdim=True)
            tokens.append(cur[:, 0].numpy())
            mask = torch.cat([mask, torch.ones_like(cur)], 1)
    return np.stack(tokens, 1), np.stack(steps, 1)


def _ort_greedy(path, ids, mask, n_new):
    """A plain greedy loop over the exported graph, padded rows, the cache fed back as it comes out."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past_in = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    b = ids.shape[0]
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    feeds = {n: np.zeros((b, shapes[n][1], 0, shapes[n][3]), np.float32) for n in past_in}
    tokens, steps, cur = [], [], ids
    for _ in range(n_new):
        pos = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)[:, -cur.shape[1]:].astype(np.int64)
        outs = sess.run(None, {"input_ids": cur, "attention_mask": mask, "position_ids": pos, **feeds})
        last = outs[0][:, -1]
        steps.append(last)
        cur = last.argmax(-1)[:, None].astype(np.int64)
        tokens.append(cur[:, 0])
        feeds = dict(zip(past_in, outs[1:]))
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)
    return np.stack(tokens, 1), np.stack(steps, 1), outs[1]


@pytest.mark.parametrize("fam", SLIDING)
def test_sliding_window_left_padding_matches_transformers(tmp_path_factory, fam):
    """A left-padded batch decoded far past the window: the exported graph equals transformers' own
    sliding cache, row by row, and each row equals its prompt decoded alone (batch of 2 against 1)."""
    from transformers import AutoModelForCausalLM

    folder, path, code, _, err = _convert(tmp_path_factory, fam)
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    window = model.config.sliding_window
    rng = np.random.default_rng(7)
    long, short = rng.integers(1, 64, (1, 11)), rng.integers(1, 64, (1, 4))
    ids = np.zeros((2, 11), np.int64)
    mask = np.zeros((2, 11), np.int64)
    ids[0], mask[0] = long[0], 1
    ids[1, 7:], mask[1, 7:] = short[0], 1
    assert 11 + NEW_TOKENS > 2 * window  # the window slides well past the prompts and the padding
    ref_tokens, ref_logits = _hf_greedy(model, ids, mask, NEW_TOKENS)
    tokens, logits, present = _ort_greedy(path, ids, mask, NEW_TOKENS)
    assert present.shape[2] == 11 + NEW_TOKENS - 1  # the graph's cache holds the whole past
    np.testing.assert_array_equal(tokens, ref_tokens)
    print(f"{fam}: ORT vs transformers, left-padded past the window: max logit diff "
          f"{float(np.abs(logits - ref_logits).max()):.3g}")
    assert float(np.abs(logits - ref_logits).max()) < 1e-4
    for row, prompt in enumerate((long, short)):
        alone_tokens, alone_logits, _ = _ort_greedy(path, prompt.astype(np.int64), np.ones_like(prompt), NEW_TOKENS)
        np.testing.assert_array_equal(alone_tokens[0], tokens[row])
        assert float(np.abs(alone_logits[0] - logits[row]).max()) < 1e-4
