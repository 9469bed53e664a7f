"""Generation parity for decoders with a KV cache: greedy decoding in two runtimes, step by step.

A *step function* maps ``(input_ids, attention_mask, position_ids, past)`` to ``(logits, present)``
with numpy arrays; torch (through the export wrapper) and onnxruntime both provide one, so
one greedy loop and one teacher-forced loop serve the convert check and the quantized gate.
Cache tensors use the ecosystem's names: ``past_key_values.{i}.key/value`` in,
``present.{i}.key/value`` out (Optimum, onnxruntime-genai).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

#: Greedy tokens generated per prompt by default.
DEFAULT_NEW_TOKENS = 32
#: Prompt lengths: two of the same length batch together; the shorter one is left-padded.
PROMPT_LENGTHS = (8, 8, 5)

#: Max logit change of a row when another row joins its batch (float noise only).
BATCH_INVARIANCE_ATOL = 1e-3

Step = Callable[[np.ndarray, np.ndarray, np.ndarray, list], tuple]


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


@dataclass(frozen=True)
class CacheLayout:
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype: str = "float32"

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.dtype) for _ in range(2 * self.layers)]


def is_decoder_graph(input_names: Sequence[str]) -> bool:
    names = set(input_names)
    return {"input_ids", "attention_mask", "position_ids", "past_key_values.0.key"} <= names


def layout_from_session(sess) -> CacheLayout:
    ins = {i.name: i for i in sess.get_inputs()}
    layers = sum(1 for n in ins if n.startswith("past_key_values.") and n.endswith(".key"))
    shape = ins["past_key_values.0.key"].shape
    vocab = next(o.shape[-1] for o in sess.get_outputs() if o.name == "logits")
    dtype = "float16" if "float16" in ins["past_key_values.0.key"].type else "float32"
    return CacheLayout(layers, int(shape[1]), int(shape[3]), int(vocab), dtype)


def cache_step(run: Callable[[list, dict], Sequence], layers: int) -> Step:
    """A step function over any runtime: ``run(output names, feeds)`` returns the outputs in that order
    (onnxruntime's ``sess.run``, or one Triton inference request)."""
    pin, pout = past_names(layers), present_names(layers)
    outs = ["logits"] + pout

    def step(ids, mask, pos, past):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **dict(zip(pin, past))}
        res = run(outs, feeds)
        return res[0], list(res[1:])
    return step


def ort_step(sess) -> Step:
    return cache_step(sess.run, layout_from_session(sess).layers)


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids from a (left-padded) mask: 0 at each row's first real token (HF's convention)."""
    pos = np.cumsum(mask, axis=-1) - 1
    pos[mask == 0] = 1
    return pos.astype(np.int64)


def make_prompts(vocab: int, seed: int = 0, lengths: Sequence[int] = PROMPT_LENGTHS) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 1234)
    return [rng.integers(0, vocab, size=(1, n)).astype(np.int64) for n in lengths]


def left_pad(prompts: Sequence[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = max(p.shape[1] for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for r, p in enumerate(prompts):
        ids[r, width - p.shape[1]:] = p[0]
        mask[r, width - p.shape[1]:] = 1
    return ids, mask


def cases(prompts: Sequence[np.ndarray]) -> list[tuple[str, np.ndarray, np.ndarray, tuple[int, ...]]]:
    """(name, ids, mask, prompt index per row): each prompt alone, the first two batched when their
    lengths agree, and the first with the last left-padded when the last is shorter."""
    out = [(f"greedy.{i}", p, np.ones_like(p), (i,)) for i, p in enumerate(prompts)]
    if len(prompts) >= 2 and prompts[0].shape == prompts[1].shape:
        ids = np.concatenate([prompts[0], prompts[1]], 0)
        out.append(("batch", ids, np.ones_like(ids), (0, 1)))
    if len(prompts) >= 2 and prompts[-1].shape[1] < prompts[0].shape[1]:
        ids, mask = left_pad([prompts[0], prompts[-1]])
        out.append(("left_padded", ids, mask, (0, len(prompts) - 1)))
    return out


def decode(step: Step, layout: CacheLayout, ids: np.ndarray, mask: np.ndarray, n_new: int,
           forced: np.ndarray | None = None) -> dict:
    """Greedy decoding with the cache (or teacher forcing when ``forced`` holds the tokens to feed).

    Returns tokens (B, n_new) chosen by this model, the last-position logits per step (B, n_new, V)
    and the prefill logits (B, S, V), computed with an empty past.
    """
    batch = ids.shape[0]
    past = layout.empty_past(batch)
    pos = positions(mask)
    tokens, logits, prefill = [], [], None
    cur_ids, cur_mask, cur_pos = ids, mask, pos
    for t in range(n_new):
        out, past = step(cur_ids, cur_mask, cur_pos, list(past))
        out = np.asarray(out, np.float32)
        if prefill is None:
            prefill = out
        last = out[:, -1, :]
        logits.append(last)
        choice = last.argmax(-1).astype(np.int64)
        tokens.append(choice)
        nxt = forced[:, t] if forced is not None else choice
        cur_ids = nxt[:, None].astype(np.int64)
        cur_mask = np.concatenate([cur_mask, np.ones((batch, 1), np.int64)], axis=1)
        cur_pos = cur_pos[:, -1:] + 1
    return {"tokens": np.stack(tokens, 1), "logits": np.stack(logits, 1), "prefill": prefill}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 1.0 if na == nb == 0 else (0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb)))


def compare_steps(ref_logits: np.ndarray, cand_logits: np.ndarray, ref_tokens: np.ndarray,
                  cand_tokens: np.ndarray) -> dict:
    """Per-step agreement, logit cosine, max |diff| and the reference's top-1 margin, for one sequence."""
    n = len(ref_tokens)
    agree = [bool(a == b) for a, b in zip(ref_tokens, cand_tokens)]
    top2 = np.sort(ref_logits, axis=-1)[:, -2:]
    margins = (top2[:, 1] - top2[:, 0]).astype(np.float64)
    cos = [_cosine(ref_logits[t], cand_logits[t]) for t in range(n)]
    diff = [float(np.max(np.abs(ref_logits[t].astype(np.float64) - cand_logits[t]))) for t in range(n)]
    first = next((t for t, a in enumerate(agree) if not a), None)
    return {"steps": n, "agreement": int(sum(agree)), "first_divergence": first,
            "min_cosine": float(min(cos)) if cos else 1.0, "max_abs_diff": float(max(diff)) if diff else 0.0,
            "min_margin": float(margins.min()) if n else None, "mean_margin": float(margins.mean()) if n else None,
            "per_step": {"agree": agree, "cosine": [round(c, 7) for c in cos],
                         "max_abs_diff": [float(f"{d:.4g}") for d in diff],
                         "margin": [round(float(m), 5) for m in margins]}}


def summarize(rows: Sequence[dict]) -> dict:
    """Worst case over several sequences' ``compare_steps`` results."""
    return {"sequences": len(rows), "steps": sum(r["steps"] for r in rows),
            "agreement": sum(r["agreement"] for r in rows),
            "agreement_rate": sum(r["agreement"] for r in rows) / max(1, sum(r["steps"] for r in rows)),
            "min_cosine": min(r["min_cosine"] for r in rows), "max_abs_diff": max(r["max_abs_diff"] for r in rows),
            "first_divergence": min((r["first_divergence"] for r in rows if r["first_divergence"] is not None),
                                    default=None),
            "min_margin": min(r["min_margin"] for r in rows)}


def reference_run(step: Step, layout: CacheLayout, prompts: Sequence[np.ndarray], n_new: int) -> list[dict]:
    """The reference's greedy decode of each prompt alone (batch 1)."""
    return [decode(step, layout, p, np.ones_like(p), n_new) for p in prompts]


def fp32_parity(step: Step, layout: CacheLayout, prompts: Sequence[np.ndarray], refs: Sequence[dict],
                n_new: int, max_diff: float):
    """Checks of a converted decoder against its source's greedy decodes (``refs``, batch 1 each).

    greedy: each prompt alone, free-running; prefill: all prompt positions with an empty past;
    batch: the first two prompts batched; left_padded: the first and last prompts, the shorter
    left-padded. Every one must reproduce the reference tokens with logits within ``max_diff``.
    """
    from retool.types import CheckResult

    checks, data = [], {"new_tokens": n_new, "prompt_lengths": [int(p.shape[1]) for p in prompts],
                        "max_logit_diff_gate": max_diff}
    greedy = []
    prefill_diff = 0.0
    for p, ref in zip(prompts, refs):
        got = decode(step, layout, p, np.ones_like(p), n_new)
        greedy.append(compare_steps(ref["logits"][0], got["logits"][0], ref["tokens"][0], got["tokens"][0]))
        prefill_diff = max(prefill_diff, float(np.max(np.abs(ref["prefill"] - got["prefill"]))))
    data["prefill_max_abs_diff"] = prefill_diff

    def gate(name, rows, what):
        s = summarize(rows)
        ok = s["agreement"] == s["steps"] and s["max_abs_diff"] < max_diff
        msg = "" if ok else (f"{s['steps'] - s['agreement']} of {s['steps']} tokens differ (first at step "
                             f"{s['first_divergence']})" if s["agreement"] != s["steps"]
                             else f"max logit diff {s['max_abs_diff']:.3g} >= {max_diff:g}")
        checks.append(CheckResult(f"generation:{name}", ok, s["agreement_rate"], 1.0, msg or what,
                                  {k: v for k, v in s.items()}))
        data[name] = {**s, "rows": rows}
    gate("greedy", greedy, f"{len(prompts)} prompts x {n_new} greedy tokens, with the cache")
    checks.append(CheckResult("generation:prefill", prefill_diff < max_diff, prefill_diff, max_diff,
                              "" if prefill_diff < max_diff else f"prefill logits differ by {prefill_diff:.3g}",
                              {"max_abs_diff": prefill_diff}))
    what = {"batch": "batch of 2 equals each prompt alone", "left_padded": "a left-padded batch equals each prompt alone"}
    for name, ids, mask, rows_of in cases(prompts)[len(prompts):]:
        got = decode(step, layout, ids, mask, n_new)
        rows = [compare_steps(refs[i]["logits"][0], got["logits"][r], refs[i]["tokens"][0], got["tokens"][r])
                for r, i in enumerate(rows_of)]
        gate(name, rows, what[name])
    return checks, data


def quantized_gate(ref_step: Step | None, cand_step: Step, layout: CacheLayout, prompts: Sequence[np.ndarray],
                   n_new: int, min_agreement: float, min_cosine: float, free_running: bool,
                   refs: Sequence[dict] | None = None):
    """Gate a quantized decoder against the fp32 one.

    Teacher forcing feeds the reference's tokens to both, so one early flip does not cascade;
    ``free_running`` also requires the candidate's own greedy tokens to match. ``refs``: the
    reference's decodes of each prompt alone when they are already known (stored at publish),
    instead of running ``ref_step``.
    """
    from retool.types import CheckResult

    refs = list(refs) if refs is not None else reference_run(ref_step, layout, prompts, n_new)
    forced = [decode(cand_step, layout, p, np.ones_like(p), n_new, forced=r["tokens"]) for p, r in zip(prompts, refs)]
    tf_rows = [compare_steps(r["logits"][0], f["logits"][0], r["tokens"][0], f["tokens"][0])
               for r, f in zip(refs, forced)]
    s = summarize(tf_rows)
    data = {"new_tokens": n_new, "prompt_lengths": [int(p.shape[1]) for p in prompts],
            "teacher_forced": {**s, "rows": tf_rows}, "gate": {"min_agreement": min_agreement,
                                                               "min_cosine": min_cosine,
                                                               "free_running": free_running}}
    fails = []
    if s["agreement_rate"] < min_agreement:
        fails.append(f"teacher-forced top-1 agreement {s['agreement']}/{s['steps']} < {min_agreement:.4g}")
    if s["min_cosine"] < min_cosine:
        fails.append(f"min step cosine {s['min_cosine']:.4f} < {min_cosine}")
    checks = [CheckResult("generation:teacher_forced", not fails, s["agreement_rate"], min_agreement,
                          "; ".join(fails), {k: v for k, v in s.items()})]
    if len(prompts) >= 2 and prompts[0].shape == prompts[1].shape:
        # a row's logits must not depend on its batch neighbours (quantize_dynamic's shared scale breaks this).
        # Gated with the strict (free-running) gate; reported otherwise: int4 at accuracy_level 4 moved logits
        # by 0.05 here (its batched kernel differs from the single-row one), int8 weight-only by 0.
        ids = np.concatenate([prompts[0], prompts[1]], 0)
        both = decode(cand_step, layout, ids, np.ones_like(ids), n_new,
                      forced=np.concatenate([refs[0]["tokens"], refs[1]["tokens"]], 0))
        diff = max(float(np.max(np.abs(both["logits"][r] - forced[r]["logits"][0]))) for r in range(2))
        data["batch_invariance_max_abs_diff"] = diff
        checks.append(CheckResult("generation:batch_invariance", diff <= BATCH_INVARIANCE_ATOL, diff,
                                  BATCH_INVARIANCE_ATOL, "" if diff <= BATCH_INVARIANCE_ATOL else
                                  f"a row's logits change by {diff:.3g} when another row is batched with it",
                                  {"max_abs_diff": diff}, "gate" if free_running else "info"))
    if free_running:
        free = [decode(cand_step, layout, p, np.ones_like(p), n_new) for p in prompts]
        fr_rows = [compare_steps(r["logits"][0], f["logits"][0], r["tokens"][0], f["tokens"][0])
                   for r, f in zip(refs, free)]
        fs = summarize(fr_rows)
        data["free_running"] = {**fs, "rows": fr_rows}
        ok = fs["agreement"] == fs["steps"]
        checks.append(CheckResult("generation:free_running", ok, fs["agreement_rate"], 1.0,
                                  "" if ok else f"{fs['steps'] - fs['agreement']} of {fs['steps']} greedy tokens "
                                                f"differ (first at step {fs['first_divergence']})", dict(fs)))
    return checks, data
