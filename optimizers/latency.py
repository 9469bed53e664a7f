"""Latency of model variants at batch 1: fixed threads, spinning off, warmed up, interleaved, medians.

The timing loop is the validators' (alternating order, GC off); this module only opens the
ONNX sessions and reduces the samples to the figures an optimisation report carries.
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def measure(models: Mapping[str, object], feeds: Mapping[str, np.ndarray], threads: int | None = None,
            warmup: int = 5, min_rounds: int = 10, max_rounds: int = 5000, budget_s: float = 2.0,
            with_samples: bool = False):
    """Median latency (ms) of each model on ``feeds``; one run of each per round so drift hits all alike.

    Each variant's ``ratio_vs_fp32`` carries ``decision``: the one rule (retool.speed) on "not slower
    than fp32". ``with_samples``: also return the per-round times (wall, and at 1 thread the
    calling thread's CPU time, which decisions use then): ``(out, {"wall": ..., "cpu": ...})``.
    """
    from retool.runtime import make_session, run_session
    from retool.validators.latency import Plan, measure_interleaved

    threads = threads or default_threads()
    sessions = {k: make_session(p, threads=threads) for k, p in models.items()}
    plan = Plan(runs=None, time_budget_s=budget_s, warmup=warmup, min_runs=min_rounds, max_runs=max_rounds)
    times, cpu = measure_interleaved({k: (lambda s=s: run_session(s, feeds)) for k, s in sessions.items()}, plan,
                                     cpu_times=True)
    out = summarize_times(times, cpu, threads)
    return (out, {"wall": times, "cpu": cpu}) if with_samples else out


def judged(samples: Mapping[str, Mapping[str, list]], threads: int) -> Mapping[str, list]:
    """The series decisions use: thread CPU time at 1 thread (load-robust), wall time otherwise."""
    return samples["cpu"] if threads == 1 and samples.get("cpu") else samples["wall"]


def summarize_times(times: Mapping[str, list], cpu: Mapping[str, list] | None, threads: int) -> dict:
    """The figures of :func:`measure` from per-round times (ms)."""
    from retool import speed

    basis = cpu if threads == 1 and cpu else times
    out = {"threads": threads, "batch": 1, "rounds": len(next(iter(times.values()))), "spinning": False,
           "variants": {}}
    for k, ts in times.items():
        a = np.asarray(ts)
        est, lo, hi = speed.sample_interval(ts)
        out["variants"][k] = {"p50_ms": round(float(np.median(a)), 4), "p90_ms": round(float(np.percentile(a, 90)), 4),
                              "min_ms": round(float(a.min()), 4), "p50_ci_ms": [round(lo, 4), round(hi, 4)]}
        if cpu and cpu.get(k):
            out["variants"][k]["cpu_p50_ms"] = round(float(np.median(cpu[k])), 4)
        if "fp32" in times and k != "fp32":  # paired per-round ratios: their spread says what is noise
            r = a / np.asarray(times["fp32"])
            out["variants"][k]["ratio_vs_fp32"] = {q: round(float(np.percentile(r, p)), 4)
                                                   for q, p in (("p25", 25), ("p50", 50), ("p75", 75))}
            out["variants"][k]["ratio_vs_fp32"]["decision"] = versus_fp32(basis["fp32"], basis[k]).to_dict()
    if "fp32" in times:  # each variant's speed-up over fp32, with the spread of the paired rounds
        from retool.speed import paired

        out["speedup_vs_fp32"] = {k: paired(times["fp32"], ts) for k, ts in times.items() if k != "fp32"}
    return out


def versus_fp32(fp32_ms, candidate_ms):
    """The one rule (retool.speed) on "the candidate is not slower than fp32": the paired speed-up
    fp32/candidate against 1/(1 + 2 %). ``fail`` means slower beyond the noise."""
    from retool import speed
    from retool.validators.decide_gates import NOT_SLOWER_THRESHOLD

    return speed.decide_ratio(fp32_ms, candidate_ms, NOT_SLOWER_THRESHOLD)


#: fp32 latency at batch 1 under which a model counts as small: per-op quantize/dequantize and
#: kernel overheads then weigh more than the int8 arithmetic saves
SMALL_MODEL_MS = 1.0


def slower_verdict(decision, *, name: str, precision: str, method: str | None, fp32_p50_ms: float,
                   cand_p50_ms: float, threads: int, cpu=None) -> dict:
    """What optimize records about a quantized build's speed against fp32, and the warning it prints
    when the build is slower beyond the noise, with the figures and the likely reasons."""
    from retool.speed import format_decision

    d = decision.to_dict() if hasattr(decision, "to_dict") else dict(decision)
    out = {"slower": d["outcome"] == "fail", "decision": d, "fp32_p50_ms": fp32_p50_ms,
           "candidate_p50_ms": cand_p50_ms, "threads": threads, "batch": 1}
    if not out["slower"] or precision in ("fp32", "auto"):
        out["slower"] = False
        return out
    reasons = likely_reasons(precision=precision, method=method, fp32_p50_ms=fp32_p50_ms, cpu=cpu)
    out["reasons"] = reasons
    out["warning"] = (f"{name} ({precision}) is SLOWER than fp32 for this model here: {cand_p50_ms:.3f} ms vs "
                      f"{fp32_p50_ms:.3f} ms at batch 1, {threads} thread(s); speed-up {format_decision(d)}; "
                      f"likely: {'; '.join(reasons)}")
    return out


def likely_reasons(*, precision: str, method: str | None, fp32_p50_ms: float, cpu=None) -> list[str]:
    out = []
    if fp32_p50_ms < SMALL_MODEL_MS:
        out.append(f"the model is small (fp32 {fp32_p50_ms:.3f} ms per call): quantize/dequantize and per-op "
                   f"overheads outweigh what int8 arithmetic saves")
    if method == "weight_only":
        out.append("weight-only MatMulNBits unpacks weights on every call; it pays on large memory-bound "
                   "MatMuls (decoders), not at this size")
    elif cpu is not None and getattr(cpu, "arch", "") == "x86_64" and not cpu.vnni:
        out.append(f"this CPU ({cpu.kind}) has no VNNI: u8 x s8 products take the AVX2 path, which gains "
                   f"at most about 1.85x over fp32 before the quantize/dequantize cost")
    if method == "dynamic":
        out.append("dynamic quantization computes activation ranges on every call")
    return out or ["the int8 kernels do not pay for this model's ops on this CPU"]


def record_speed(cand, target: str, lat: dict, cpu, auto: bool) -> dict | None:
    """Judge a measured quantized result against fp32 at optimize time: the verdict goes to the report
    (``speed_vs_fp32``) and, when it is slower beyond the noise, a warning to the console and the report."""
    from retool import console

    d = (lat.get("ratio_vs_fp32") or {}).get("decision")
    if not d or cand.precision in ("fp32", "auto"):
        return None
    method = getattr(cand.profile, "method", None) or target_method(target)
    v = slower_verdict(d, name=cand.target, precision=cand.precision, method=method, fp32_p50_ms=lat["fp32_p50_ms"],
                       cand_p50_ms=lat["candidate_p50_ms"], threads=lat["threads"], cpu=cpu)
    if v["slower"]:
        w = v["warning"] + ("; kept only because no float candidate passed" if auto else
                            f"; kept only because --target {target} forces it: cpu-auto would keep fp32")
        v["warning"] = w
        console.warn(w)
        cand.warnings.append(w)
    cand.extra["speed_vs_fp32"] = v
    return v


def target_method(name: str) -> str | None:
    from retool.optimizers.targets import get_target

    try:
        return get_target(name).method
    except Exception:  # a derived name (cpu-int8-percentile): the profile is on the candidate
        return None


def slower_than_fp32(variant: dict) -> bool:
    """Slower beyond the noise: the not-slower decision (retool.speed) failed, i.e. the whole
    interval of the fp32/candidate speed-up is below 1/(1 + 2 %)."""
    r = variant.get("ratio_vs_fp32")
    if not r:
        return False
    d = r.get("decision")
    return d["outcome"] == "fail" if d else r["p25"] > 1.0


#: ONNX metadata key the serving configuration reads (Triton's intra_op_thread_count).
THREADS_KEY = "retool.intra_op_threads"


def all_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


#: n threads are served only when they run a request at least this efficiently (speed-up / n): below it
#: the extra cores cost more per inference than the latency gained (a 1.06x gain from a second core
#: almost doubles the CPU per request), and gains that small flip between identical runs
MIN_THREAD_EFFICIENCY = 0.6


def thread_gain_needed(n: int) -> float:
    from retool import speed

    return max(1.0 + speed.NOISE_FLOOR, MIN_THREAD_EFFICIENCY * n)


def thread_sweep(fp32_path, cand_path, feeds, budget_s: float = 1.0) -> dict:
    """The candidate (and fp32) at 1 and at all threads; the fastest intra-op thread count for the candidate.

    At small sizes more threads can be slower (a 4-layer BERT ran slower in int8 at 2 threads than at 1):
    the best count is a property of the artifact, so it is measured and handed to serving."""
    from retool import speed

    counts = sorted({1, all_threads()})
    out: dict = {"measured": {}, "key": THREADS_KEY}
    for t in counts:
        m = measure({"fp32": fp32_path, "candidate": cand_path}, feeds, threads=t, budget_s=budget_s)
        c = m["variants"]["candidate"]
        out["measured"][str(t)] = {"candidate_p50_ms": c["p50_ms"], "fp32_p50_ms": m["variants"]["fp32"]["p50_ms"],
                                   "ratio_vs_fp32": c.get("ratio_vs_fp32"), "rounds": m["rounds"]}
    # the decision: the candidate at 1 and at n threads timed in the same rounds (paired, so drift between
    # blocks cannot decide it); more threads win only when decidedly faster, a tie keeps fewer threads,
    # which leaves cores to concurrent requests
    best, why = counts[0], f"{counts[0]} thread(s): the only count measured"
    if len(counts) > 1:
        from retool.runtime import make_session, run_session
        from retool.validators.latency import Plan, measure_interleaved

        n = counts[-1]
        sessions = {t: make_session(cand_path, threads=t) for t in counts}
        plan = Plan(runs=None, time_budget_s=budget_s, warmup=5, min_runs=10, max_runs=5000)
        from retool import machine

        with machine.watch("thread sweep") as block:
            paired, _ = measure_interleaved({t: (lambda s=s: run_session(s, feeds)) for t, s in sessions.items()},
                                            plan, cpu_times=True)
        # n threads' speed-up over 1, against what the extra cores must buy (see MIN_THREAD_EFFICIENCY)
        d = speed.decide_ratio(paired[1], paired[n], thread_gain_needed(n))
        others = (block.result or {}).get("others_cpu_pct")
        if others is not None and others > machine.BUSY_OTHERS_PCT:
            # other processes held the cores n threads need: the sweep measured them, not the artifact
            d = d.with_outcome(speed.UNDECIDED, f"timed while other processes used {others:g}% of the CPUs: "
                                                f"not decided on a busy machine; rerun on a quiet one")
        out["measured"][str(n)]["decision_vs_1"] = d.to_dict()
        out["machine"] = block.result
        if d.passed:
            best, why = n, f"{n} threads decidedly worth their cores ({d.text})"
        else:
            why = (f"1 thread kept: {n} threads not decidedly worth their cores ({d.text}; they must run at "
                   f"least {MIN_THREAD_EFFICIENCY:.0%} efficiently); a tie keeps fewer threads")
    out["best_intra_op_threads"] = best
    out["why"] = why
    return out


def step_latency(ctx, path) -> dict:
    """One accuracy-search step against fp32 at batch 1 (a short budget: it is per step)."""
    m = measure({"fp32": ctx.src, "candidate": path}, ctx.heldout[0], threads=ctx.threads, budget_s=1.0)
    c, f = m["variants"]["candidate"], m["variants"]["fp32"]
    return {"p50_ms": c["p50_ms"], "fp32_p50_ms": f["p50_ms"], "ratio_vs_fp32": c.get("ratio_vs_fp32"),
            "threads": m["threads"], "batch": 1}
