"""``cpu-auto``: build the candidates, measure them here, keep the fastest that passes.

Quantization can make a model slower (dynamic int8 convolutions ran 4x slower
than fp32 on an AVX2 CPU), so the choice is measured, never assumed.
"""
from __future__ import annotations

from retool import console
from retool.errors import OptimizationError


def choose(profile, ctx):
    """Returns (chosen Candidate, data for the report's ``auto`` section).

    Always measures, whatever ``measure`` says for other targets: choosing without
    measuring is the mistake this target exists to avoid."""
    from retool.optimizers.core import _check_loads, _resolve_tolerance, build_candidate
    from retool.optimizers.targets import get_target

    built, rows = [], []
    for name in profile.candidates:
        sub = get_target(name)
        tol = _resolve_tolerance(sub, getattr(ctx, "user_tolerance", None))
        try:
            cand = build_candidate(sub, ctx, tol)
            _check_loads(cand)
        except OptimizationError as exc:
            rows.append({"target": name, "built": False, "passed": False, "reason": str(exc)})
            continue
        built.append(cand)
        rows.append({"target": name, "built": True, "passed": cand.passed, "excluded_nodes": len(cand.excluded),
                     "tolerance": tol.to_dict(),
                     "parity": {c.name: {k: (c.details or {}).get(k) for k in ("cosine", "top1", "max_abs")}
                                for c in cand.checks}})
    if not built:
        raise OptimizationError(f"{ctx.src}: no {profile.name} candidate could be built "
                                f"({'; '.join(r['reason'] for r in rows)})")
    passing = [c for c in built if c.passed]
    by_name = {r["target"]: r for r in rows}
    lat = None
    if passing:
        from retool.optimizers import latency

        models = {"fp32": ctx.src, **{c.target: c.path for c in passing}}
        with console.step(f"measuring {len(passing)} candidate(s) against fp32 (batch 1, {ctx.threads} threads)"):
            lat = latency.measure(models, ctx.heldout[0], threads=ctx.threads)
        fp32 = lat["variants"]["fp32"]["p50_ms"]
        for c in passing:
            p50 = lat["variants"][c.target]["p50_ms"]
            by_name[c.target].update(p50_ms=p50, ratio=round(p50 / fp32, 4) if fp32 else None)
        chosen = min(passing, key=lambda c: lat["variants"][c.target]["p50_ms"])
        why = (f"{chosen.target} is the fastest candidate that meets its tolerance "
               f"({lat['variants'][chosen.target]['p50_ms']:.3f} ms vs fp32 {fp32:.3f} ms at batch 1, "
               f"{lat['threads']} threads)")
    else:
        chosen = max(built, key=lambda c: min([(x.details or {}).get("cosine", 0) or 0 for x in c.checks] or [0]))
        why = "no candidate meets its tolerance"
    for c in built:
        r = by_name[c.target]
        if c is chosen:
            r["reason"] = "chosen: " + why
        elif not c.passed:
            r["reason"] = "misses its tolerance: " + "; ".join(x.message for x in c.checks if not x.passed)[:300]
        else:
            r["reason"] = f"slower than {chosen.target}" if lat else f"{chosen.target} came first"
    console.info(f"cpu-auto: {why}")
    return chosen, {"candidates": rows, "chosen": chosen.target, "why": why, "latency": lat}
