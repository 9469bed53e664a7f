"""``cpu-auto``: build the candidates, measure them here, keep the fastest that passes.

Quantization can make a model slower (dynamic int8 convolutions ran 4x slower
than fp32 on an AVX2 CPU), so the choice is measured, never assumed.
"""
from __future__ import annotations

from retool import console
from retool.errors import OptimizationError

#: Calibration methods cpu-auto tries for a static target when none was asked for.
AUTO_METHODS = ("minmax", "percentile", "entropy")


def choose(profile, ctx):
    """Returns (chosen Candidate, data for the report's ``auto`` section).

    Always measures, whatever ``measure`` says for other targets: choosing without
    measuring is the mistake this target exists to avoid."""
    from retool.optimizers.core import _check_loads, _resolve_tolerance, build_candidate
    from retool.optimizers.targets import get_target

    built, rows, labels = [], [], {}
    for name in profile.candidates:
        sub = get_target(name)
        tol = _resolve_tolerance(sub, getattr(ctx, "user_tolerance", None))
        # Static targets try every calibration method unless one was asked for: which one
        # is most faithful depends on the model, and it costs only calibration time.
        methods = [ctx.method] if ctx.method or sub.method != "static" else list(AUTO_METHODS)
        for method in methods:
            label = name if method in (None, methods[0]) else f"{name}[{method}]"
            try:
                cand = build_candidate(sub, ctx, tol, method=method)
                _check_loads(cand)
            except OptimizationError as exc:
                rows.append({"target": label, "built": False, "passed": False, "reason": str(exc)})
                continue
            built.append(cand)
            labels[id(cand)] = label
            rows.append({"target": label, "built": True, "passed": cand.passed, "calibration": cand.method,
                         "excluded_nodes": len(cand.excluded), "tolerance": tol.to_dict(),
                         "parity": {c.name: {k: (c.details or {}).get(k) for k in ("cosine", "top1", "max_abs")}
                                    for c in cand.checks}})
    if not built:
        raise OptimizationError(f"{ctx.src}: no {profile.name} candidate could be built "
                                f"({'; '.join(r['reason'] for r in rows)})")
    passing = [c for c in built if c.passed]
    lab = lambda c: labels[id(c)]  # noqa: E731
    by_name = {r["target"]: r for r in rows}
    lat = None
    if passing:
        from retool.optimizers import latency

        models = {"fp32": ctx.src, **{lab(c): c.path for c in passing}}
        with console.step(f"measuring {len(passing)} candidate(s) against fp32 (batch 1, {ctx.threads} threads)"):
            lat = latency.measure(models, ctx.heldout[0], threads=ctx.threads)
        fp32 = lat["variants"]["fp32"]["p50_ms"]
        for c in passing:
            v = lat["variants"][lab(c)]
            by_name[lab(c)].update(p50_ms=v["p50_ms"], ratio=round(v["p50_ms"] / fp32, 4) if fp32 else None,
                                   ratio_vs_fp32=v.get("ratio_vs_fp32"))
        chosen, slow = pick(passing, lat["variants"], lab)
        for c in slow:
            by_name[lab(c)]["slower_than_fp32"] = True
        why = (f"{lab(chosen)} is the fastest candidate that meets its tolerance "
               f"({lat['variants'][lab(chosen)]['p50_ms']:.3f} ms vs fp32 {fp32:.3f} ms at batch 1, "
               f"{lat['threads']} threads)")
        if chosen in slow:
            why += "; it is SLOWER than fp32, but no float candidate passed"
    else:
        chosen = max(built, key=lambda c: min([(x.details or {}).get("cosine", 0) or 0 for x in c.checks] or [0]))
        why = "no candidate meets its tolerance"
    for c in built:
        r = by_name[lab(c)]
        if c is chosen:
            r["reason"] = "chosen: " + why
        elif not c.passed:
            r["reason"] = "misses its tolerance: " + "; ".join(x.message for x in c.checks if not x.passed)[:300]
        else:
            r["reason"] = (("slower than fp32" if r.get("slower_than_fp32") else f"slower than {lab(chosen)}")
                           if lat else f"{lab(chosen)} came first")
    console.info(f"cpu-auto: {why}")
    return chosen, {"candidates": rows, "chosen": chosen.target, "chosen_variant": lab(chosen), "why": why,
                    "latency": lat}


def pick(passing: list, variants: dict, label) -> tuple[object, list]:
    """The fastest passing candidate, never an int8 one slower than fp32 beyond the noise while a
    float one passes. Returns (chosen, the candidates rejected as slower than fp32)."""
    from retool.optimizers.latency import slower_than_fp32

    slow = [c for c in passing if c.precision != "fp32" and slower_than_fp32(variants[label(c)])]
    keep = [c for c in passing if c not in slow] or passing
    return min(keep, key=lambda c: variants[label(c)]["p50_ms"]), slow
