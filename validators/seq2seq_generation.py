"""Generation parity for encoder-decoders (T5, BART, Marian, MBart): greedy decoding in two runtimes.

The loop (what a server or client runs, described in ``NAME.seq2seq.json`` beside the ONNX files):

1. the encoder, once: ``input_ids``, ``attention_mask`` -> ``last_hidden_state`` and the cross-attention
   cache ``present.{i}.encoder.key/value`` (batch, heads, encoder_sequence, head_dim);
2. the decoder, once per new token: ``input_ids`` (the start token, then the last chosen one),
   ``encoder_attention_mask``, ``past_key_values.{i}.decoder.key/value`` (empty at the first step, then
   the previous step's ``present.{i}.decoder.key/value``) and ``past_key_values.{i}.encoder.key/value``
   (the encoder's cross-attention cache, the same at every step) -> ``logits``, ``present.{i}.decoder.*``.

Names follow Optimum's seq2seq exports. The reference is transformers' ``generate(do_sample=False)``
(converter/hf/seq2seq.py); this module holds the runtime-agnostic loop and the checks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from retool.validators.generation import compare_steps, make_prompts, summarize

#: Greedy tokens per prompt in the convert check.
DEFAULT_NEW_TOKENS = 16
#: Encoder prompt lengths: the first two batch together; the last, shorter, is right-padded beside the first.
PROMPT_LENGTHS = (8, 8, 5)
#: The loop description written beside the decoder (NAME.onnx) and the encoder (NAME.encoder.onnx).
LOOP_SUFFIX = ".seq2seq.json"
ENCODER_SUFFIX = ".encoder.onnx"
LOOP_FORMAT = "retool.seq2seq/1"


def self_past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.decoder.{kv}" for i in range(layers) for kv in ("key", "value")]


def cross_past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.encoder.{kv}" for i in range(layers) for kv in ("key", "value")]


def self_present_names(layers: int) -> list[str]:
    return [f"present.{i}.decoder.{kv}" for i in range(layers) for kv in ("key", "value")]


def cross_present_names(layers: int) -> list[str]:
    return [f"present.{i}.encoder.{kv}" for i in range(layers) for kv in ("key", "value")]


def is_seq2seq_decoder_graph(input_names: Sequence[str]) -> bool:
    return {"input_ids", "encoder_attention_mask", "past_key_values.0.decoder.key",
            "past_key_values.0.encoder.key"} <= set(input_names)


@dataclass(frozen=True)
class Seq2SeqLayout:
    layers: int
    heads: int
    head_dim: int
    vocab: int
    decoder_start_token_id: int
    pad_token_id: int
    dtype: str = "float32"

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.heads, 0, self.head_dim), self.dtype) for _ in range(2 * self.layers)]


#: encode(ids, mask) -> cross-attention cache (2 * layers arrays)
Encode = Callable[[np.ndarray, np.ndarray], list]
#: step(ids, encoder_mask, self past, cross cache) -> (logits, self present)
Step = Callable[[np.ndarray, np.ndarray, list, list], tuple]


def encoder_runner(run: Callable[[list, dict], Sequence], layers: int) -> Encode:
    """``run(output names, feeds)``: onnxruntime's ``sess.run`` or one Triton request."""
    outs = cross_present_names(layers)

    def encode(ids, mask):
        return list(run(outs, {"input_ids": ids, "attention_mask": mask}))
    return encode


def decoder_runner(run: Callable[[list, dict], Sequence], layers: int) -> Step:
    pin, cin, pout = self_past_names(layers), cross_past_names(layers), self_present_names(layers)
    outs = ["logits"] + pout

    def step(ids, enc_mask, past, cross):
        feeds = {"input_ids": ids, "encoder_attention_mask": enc_mask, **dict(zip(pin, past)), **dict(zip(cin, cross))}
        res = run(outs, feeds)
        return res[0], list(res[1:])
    return step


def layout_from_sessions(dec_sess, loop: dict) -> Seq2SeqLayout:
    ins = {i.name: i for i in dec_sess.get_inputs()}
    layers = sum(1 for n in ins if n.startswith("past_key_values.") and n.endswith(".decoder.key"))
    shape = ins["past_key_values.0.decoder.key"].shape
    vocab = next(o.shape[-1] for o in dec_sess.get_outputs() if o.name == "logits")
    return Seq2SeqLayout(layers, int(shape[1]), int(shape[3]), int(vocab), int(loop["decoder_start_token_id"]),
                         int(loop["pad_token_id"]))


def greedy(encode: Encode, step: Step, layout: Seq2SeqLayout, ids: np.ndarray, mask: np.ndarray, n_new: int) -> dict:
    """The encoder once, then ``n_new`` greedy decoder steps: tokens (B, n) and last-position logits (B, n, V)."""
    cross = encode(ids, mask)
    batch = ids.shape[0]
    past = layout.empty_past(batch)
    cur = np.full((batch, 1), layout.decoder_start_token_id, np.int64)
    tokens, logits = [], []
    for _ in range(n_new):
        out, past = step(cur, mask, list(past), cross)
        last = np.asarray(out, np.float32)[:, -1, :]
        logits.append(last)
        cur = last.argmax(-1).astype(np.int64)[:, None]
        tokens.append(cur[:, 0])
    return {"tokens": np.stack(tokens, 1), "logits": np.stack(logits, 1)}


def right_pad(prompts: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoder inputs padded on the right, as seq2seq tokenizers pad them."""
    width = max(p.shape[1] for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for r, p in enumerate(prompts):
        ids[r, :p.shape[1]] = p[0]
        mask[r, :p.shape[1]] = 1
    return ids, mask


def cases(prompts: Sequence[np.ndarray], pad_id: int) -> list[tuple[str, np.ndarray, np.ndarray, tuple[int, ...]]]:
    """(name, ids, mask, prompt index per row): each prompt alone, the first two batched, and the first with
    the last (shorter, right-padded) batched."""
    out = [(f"greedy.{i}", p, np.ones_like(p), (i,)) for i, p in enumerate(prompts)]
    if len(prompts) >= 2 and prompts[0].shape == prompts[1].shape:
        ids = np.concatenate([prompts[0], prompts[1]], 0)
        out.append(("batch", ids, np.ones_like(ids), (0, 1)))
    if len(prompts) >= 2 and prompts[-1].shape[1] < prompts[0].shape[1]:
        ids, mask = right_pad([prompts[0], prompts[-1]], pad_id)
        out.append(("padded", ids, mask, (0, len(prompts) - 1)))
    return out


def seq2seq_prompts(vocab: int, seed: int = 0) -> list[np.ndarray]:
    return make_prompts(vocab, seed, PROMPT_LENGTHS)


_WHAT = {"greedy": "{n} prompts alone x {t} greedy tokens (encoder once, decoder with its cache)",
         "batch": "a batch of 2 equals each prompt alone", "padded": "a right-padded encoder batch equals each "
                                                                      "prompt alone"}


def parity(encode: Encode, step: Step, layout: Seq2SeqLayout, prompts: Sequence[np.ndarray], refs: Sequence[dict],
           n_new: int, max_diff: float) -> tuple[list, dict]:
    """Checks of the ONNX loop against the reference's greedy decodes (``refs``: each prompt alone, batch 1,
    {"tokens": (1, n), "logits": (1, n, V)}). Every case must give the reference's tokens, logits within
    ``max_diff``."""
    from retool.types import CheckResult

    checks: list = []
    data: dict = {"task": "text2text-generation", "new_tokens": n_new,
                  "prompt_lengths": [int(p.shape[1]) for p in prompts], "max_logit_diff_gate": max_diff}
    groups: dict[str, list] = {}
    for name, ids, mask, rows_of in cases(prompts, layout.pad_token_id):
        got = greedy(encode, step, layout, ids, mask, n_new)
        rows = [compare_steps(refs[i]["logits"][0], got["logits"][r], refs[i]["tokens"][0], got["tokens"][r])
                for r, i in enumerate(rows_of)]
        groups.setdefault(name.split(".")[0], []).extend(rows)
    for name, rows in groups.items():
        s = summarize(rows)
        ok = s["agreement"] == s["steps"] and s["max_abs_diff"] < max_diff
        msg = "" if ok else (f"{s['steps'] - s['agreement']} of {s['steps']} tokens differ (first at step "
                             f"{s['first_divergence']})" if s["agreement"] != s["steps"]
                             else f"max logit diff {s['max_abs_diff']:.3g} >= {max_diff:g}")
        checks.append(CheckResult(f"generation:{name}", ok, s["agreement_rate"], 1.0,
                                  msg or _WHAT[name].format(n=len(prompts), t=n_new), dict(s)))
        data[name] = {**s, "rows": rows}
    return checks, data
