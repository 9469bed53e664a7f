"""Perplexity of a decoder on held-out token sequences, and the candidate-against-fp32 gate.

Teacher-forced agreement looks at the top-1 token only; perplexity weighs the whole next-token
distribution, so a quantized model that keeps its argmax but spreads probability onto wrong
tokens shows here. Each sequence is scored in one prefill (empty cache), tokens from
``score_from`` on (a random prompt before that predicts nothing and would dilute the ratio).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

#: candidate perplexity / fp32 perplexity allowed by default (measured in docs/optimize.md: int4 on the
#: trained fixtures stays within 1.01; a broken quantization lands well above 1.1)
DEFAULT_MAX_PPL_RATIO = 1.05


def nll(step, layout, ids: np.ndarray, score_from: int) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens scored) of ``ids`` (N, L), predicting tokens ``score_from``..L-1."""
    ids = np.asarray(ids, np.int64)
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
    logits, _ = step(ids, mask, pos, layout.empty_past(ids.shape[0]))
    logits = np.asarray(logits, np.float64)[:, score_from - 1:-1]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    target = ids[:, score_from:]
    picked = np.take_along_axis(logp, target[..., None], -1)[..., 0]
    return float(-picked.sum()), int(target.size)


def perplexity(step, layout, texts: Sequence[tuple[np.ndarray, int]], chunk: int = 8) -> float:
    """exp(mean NLL) over ``texts``: (ids (N, L), score_from) pairs, run ``chunk`` rows at a time."""
    total, count = 0.0, 0
    for ids, start in texts:
        for i in range(0, len(ids), chunk):
            s, n = nll(step, layout, ids[i:i + chunk], max(1, int(start)))
            total, count = total + s, count + n
    return float(np.exp(total / max(1, count)))


def load_heldout(path) -> list[tuple[np.ndarray, int]]:
    """Token ids from a file: .npy (N, L) scored from position 1, or .npz with ``input_ids`` and an optional
    ``score_from``. Bad input -> UsageError naming the file."""
    from retool.errors import UsageError

    p = Path(path)
    try:
        if p.suffix == ".npz":
            with np.load(p) as z:
                ids = z["input_ids"]
                start = int(z["score_from"]) if "score_from" in z.files else 1
        else:
            ids, start = np.load(p), 1
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"{p}: cannot read held-out token ids ({type(exc).__name__}: {str(exc)[:120]}); give an "
                         f".npy of int token ids (N, L) or an .npz with input_ids (and score_from)") from None
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or not 1 <= start < ids.shape[1]:
        raise UsageError(f"{p}: held-out ids must be a 2-D integer array (sequences x tokens) longer than "
                         f"score_from={start}; got {ids.dtype} {ids.shape}")
    return [(ids.astype(np.int64), start)]


def self_generated(step, layout, seed: int, sequences: int = 16, prompt: int = 4, length: int = 40,
                   temperature: float = 1.0) -> list[tuple[np.ndarray, int]]:
    """Text sampled from the fp32 model itself after seeded random prompts, scored after the prompt: held-out
    text from the model's own distribution when no text is given (``temperature`` 0: greedy)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, layout.vocab, size=(sequences, prompt)).astype(np.int64)
    mask = np.ones_like(ids)
    past, cur, pos = layout.empty_past(sequences), ids, np.broadcast_to(np.arange(prompt), ids.shape).copy()
    out = [ids]
    for _ in range(length - prompt):
        logits, past = step(cur, mask, pos, list(past))
        last = np.asarray(logits, np.float64)[:, -1]
        if temperature <= 0:
            nxt = last.argmax(-1)
        else:
            z = (last - last.max(-1, keepdims=True)) / temperature
            p = np.exp(z)
            p /= p.sum(-1, keepdims=True)
            nxt = np.array([rng.choice(layout.vocab, p=row) for row in p])
        cur = nxt[:, None].astype(np.int64)
        out.append(cur)
        mask = np.concatenate([mask, np.ones((sequences, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
    return [(np.concatenate(out, 1), prompt)]


def ppl_gate(ref_step, cand_step, layout, texts, max_ratio: float | None):
    """(CheckResult, data): the candidate's perplexity on ``texts`` against the reference's."""
    from retool.types import CheckResult

    ref, cand = perplexity(ref_step, layout, texts), perplexity(cand_step, layout, texts)
    ratio = cand / ref
    data = {"fp32": ref, "candidate": cand, "ratio": ratio, "max_ratio": max_ratio,
            "sequences": sum(len(t) for t, _ in texts), "tokens_scored": sum(t[:, s:].size for t, s in texts)}
    ok = max_ratio is None or ratio <= max_ratio
    msg = "" if ok else f"perplexity {cand:.4g} is {ratio:.4f}x fp32's {ref:.4g} > {max_ratio:g}"
    return CheckResult("generation:perplexity", ok, ratio, max_ratio, msg or
                       f"perplexity {cand:.4g} vs fp32 {ref:.4g} ({ratio:.4f}x)", dict(data),
                       "gate" if max_ratio is not None else "info"), data
