"""Decoder latency: prefill (prompt with an empty past) and one decode step (one token, past of the
prompt's length), per variant and thread count, interleaved in alternating rounds (validators.latency).

A speed-up is ``reference p50 / candidate p50`` (> 1 means faster); each carries the spread of the
paired per-round ratios (p25-p75) and the decision rule's verdict (retool.speed.decide_ratio: a paired
bootstrap interval that contains 1, or a ratio within 2 % of 1, is no measurable difference).
"""
from __future__ import annotations

import os
from typing import Callable, Mapping

import numpy as np

from retool.validators.generation import CacheLayout, positions

#: prompt length and past length of the measured steps
PROMPT_TOKENS = 32


def thread_counts() -> list[int]:
    n = os.cpu_count() or 1
    return [1] if n == 1 else [1, n]


def ort_factory(path) -> Callable[[int], Callable]:
    """threads -> a step function on an ORT session with that many intra-op threads, spinning off."""
    def make(threads: int):
        from retool.runtime import make_session
        from retool.validators.generation import ort_step

        return ort_step(make_session(path, threads=threads))
    return make


def _bench_feeds(layout: CacheLayout, prompt_len: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, layout.vocab, (1, prompt_len)).astype(np.int64)
    mask = np.ones_like(ids)
    return ids, mask, positions(mask)


def samples(steps: Mapping[str, Callable], layout: CacheLayout, plan, prompt_len: int = PROMPT_TOKENS,
            seed: int = 0) -> tuple[dict, dict]:
    """(prefill ms samples, decode-step ms samples) per variant, rounds aligned across variants."""
    from retool.validators.latency import measure_interleaved

    ids, mask, pos = _bench_feeds(layout, prompt_len, seed)
    # the past each variant builds itself, so a quantized cache is fed back to its own model
    pasts = {k: s(ids, mask, pos, layout.empty_past(1))[1] for k, s in steps.items()}
    nxt = np.zeros((1, 1), np.int64)
    mask2 = np.ones((1, prompt_len + 1), np.int64)
    pos2 = np.full((1, 1), prompt_len, np.int64)
    pre = measure_interleaved({k: (lambda s=s: s(ids, mask, pos, layout.empty_past(1))) for k, s in steps.items()},
                              plan)
    dec = measure_interleaved({k: (lambda s=s, k=k: s(nxt, mask2, pos2, pasts[k])) for k, s in steps.items()}, plan)
    return pre, dec


def measure(factories: Mapping[str, Callable[[int], Callable]], layout: CacheLayout, reference: str = "fp32",
            threads: list[int] | None = None, prompt_len: int = PROMPT_TOKENS, budget_s: float = 1.5,
            seed: int = 0) -> dict:
    """Per thread count: each variant's prefill ms, ms per token, tokens/s, and speed-ups vs ``reference``."""
    from retool.validators.latency import Plan

    out: dict = {"prompt_tokens": prompt_len, "reference": reference, "by_threads": {}}
    for t in threads or thread_counts():
        steps = {k: f(t) for k, f in factories.items()}
        plan = Plan(runs=None, time_budget_s=budget_s, warmup=3, min_runs=10, max_runs=2000)
        pre, dec = samples(steps, layout, plan, prompt_len, seed)
        row = {}
        for k in steps:
            p, d = float(np.median(pre[k])), float(np.median(dec[k]))
            row[k] = {"prefill_ms": round(p, 4), "ms_per_token": round(d, 4), "tokens_per_s": round(1000.0 / d, 1),
                      "p99_ms_per_token": round(float(np.percentile(dec[k], 99)), 4), "rounds": len(dec[k])}
            if k != reference and reference in steps:
                row[k]["decode_speedup"] = _paired(dec[reference], dec[k])
                row[k]["prefill_speedup"] = _paired(pre[reference], pre[k])
        out["by_threads"][str(t)] = row
    return out


def _paired(ref: list, cand: list) -> dict:
    """reference/candidate per round: median and p25-p75 (the spread shown), and whether the difference
    is measurable, decided by the one rule (retool.speed: the paired bootstrap interval against 1)."""
    from retool import speed

    r = np.asarray(ref[:len(cand)]) / np.maximum(np.asarray(cand[:len(ref)]), 1e-9)
    lo, med, hi = (float(np.percentile(r, q)) for q in (25, 50, 75))
    est, ci_lo, ci_hi = speed.paired_ratio_interval(ref, cand)
    v = speed.verdict(est, (ci_lo, ci_hi))
    return {"ratio": round(med, 3), "p25": round(lo, 3), "p75": round(hi, 3), "measurable": v not in (None, speed.NONE),
            "verdict": v, "interval": [round(ci_lo, 3), round(ci_hi, 3)], "rule": speed.rule_text("ratio")}


def torch_factory(wrapper) -> Callable[[int], Callable]:
    """The torch eager step of an export wrapper, with torch's thread count set per measurement."""
    import torch

    def make(threads: int):
        def step(ids, mask, pos, past):
            torch.set_num_threads(threads)
            with torch.no_grad():
                out = wrapper(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (ids, mask, pos, *past)))
            return out[0].numpy(), [x.numpy() for x in out[1:]]
        return step
    return make
