"""The optimisation report: what was built, how it was checked and measured, and on what CPU."""
from __future__ import annotations

from retool.types import CheckResult, ProvenanceStep, Report


def build_report(art, profile, cand, ctx, tol, lat, auto_data, staged, out, digest, extra,
            started, seconds, method, seed, needs_calibration):
    import onnx

    from retool.fsutil import file_size
    from retool.optimizers import accuracy

    m = onnx.load(str(staged), load_external_data=False)
    op_counts: dict[str, int] = {}
    for n in m.graph.node:
        op_counts[n.op_type] = op_counts.get(n.op_type, 0) + 1
    layers = accuracy.source_layers(art.path, cand.excluded) if cand.excluded else {}
    # Excluded nodes are named in the pre-processed graph; their op types come from there.
    calib = ctx.calib.summary(method if cand.calibrated else None, cand.calibration_samples)
    pct = None
    if cand.calibrated and method == "percentile":
        from retool.optimizers.quantize import DEFAULT_PERCENTILE

        pct = ctx.percentile if ctx.percentile is not None else DEFAULT_PERCENTILE
        calib["percentile"] = pct
    calib["used"] = cand.calibrated
    parity = {c.name: {k: (c.details or {}).get(k) for k in ("cosine", "top1", "max_abs", "mean_abs", "max_rel")}
              for c in cand.checks}
    parity["samples"] = len(ctx.heldout)
    parity["heldout_source"] = "random" if ctx.calib.random or not ctx.calib.heldout_items else ctx.calib.source
    size_in = file_size(art.path, art.extra_files)
    size_out = file_size(staged, extra)
    if lat:
        from retool.validators.speed_gate import measured_off_target

        lat = {**lat, "measured_on": "CPUExecutionProvider"}
        off = measured_off_target(cand.target, ["CPUExecutionProvider"])
        if off:
            lat["off_target"] = off
    data = {
        "target": profile.name,
        "chosen_target": cand.target,
        "profile": (cand.profile or profile).to_dict(),
        "size_mb": round(size_out / 1e6, 4),
        "size_mb_input": round(size_in / 1e6, 4),
        "size_ratio": round(size_out / size_in, 4) if size_in else None,
        "latency": lat,
        "parity": parity,
        "tolerance": tol.to_dict(),
        "calibration": calib,
        "excluded_nodes": list(cand.excluded),
        "excluded_layers": [{"node": n, "source_layer": layers.get(n, n), **_group_cost(cand.attempts, n)}
                            for n in cand.excluded],
        "accuracy_search": cand.attempts,
        "node_types": dict(sorted(op_counts.items())),
        "tools": cand.tools,
        "evaluated_on": "CPUExecutionProvider",
    }
    if profile.provider != "CPUExecutionProvider":
        data["note"] = (f"parity was checked with CPUExecutionProvider; the target runs on {profile.provider}")
    if auto_data is not None:
        data["auto"] = auto_data
    data.update({k: v for k, v in cand.extra.items() if k != "precision_bound"})
    if ctx.goal is not None:
        data["accuracy_goal"] = {**ctx.goal.to_dict(), "met": bool(cand.passed), "heldout_samples": len(ctx.heldout),
                                 "best_reached": best_attempt(cand.attempts, cand.checks)}
        if cand.extra.get("precision_bound"):
            data["accuracy_goal"]["precision_bound"] = cand.extra["precision_bound"]
    from retool import machine
    from retool.optimizers import hardware

    # the timed blocks of this stage: those that started within its ``seconds``
    data["machine"] = machine.during(machine.now() - seconds)
    if lat and data["machine"]["busy"]:
        ctx.warnings.append(machine.describe(data["machine"]))
    mismatch = hardware.mismatch(cand.profile or profile, ctx.cpu, ctx.here)
    data["hardware"] = {"here": ctx.here.to_dict(), "tuned_for": ctx.cpu.to_dict(), "choices": list(cand.notes),
                        "mismatch": mismatch}
    warnings = list(dict.fromkeys(([ctx.calib.warnings[0]] if ctx.calib.random and needs_calibration else [])
                                  + [w for w in ctx.warnings if not ctx.calib.random] + list(cand.warnings)
                                  + mismatch))
    checks = [CheckResult("onnxruntime.load", True)] + list(cand.checks)
    if lat:
        checks.append(CheckResult("latency.speedup", True, lat["speedup"], None,
                                  f"{lat['speedup_text']}: candidate p50 {lat['candidate_p50_ms']:.3f} ms vs fp32 "
                                  f"{lat['fp32_p50_ms']:.3f} ms (batch 1, {lat['threads']} threads)",
                                  {"iqr": lat["speedup_iqr"], "verdict": lat["speedup_verdict"]}, "info"))
    step = ProvenanceStep(
        "optimize", f"retool.optimizers:{cand.target}", {**cand.versions},
        {"target": profile.name, "chosen_target": cand.target, "calibration_digest": calib["digest"] if cand.calibrated else None,
         "calibration_method": method if cand.calibrated else None, "calibration_percentile": pct, "calibration_random": ctx.calib.random if cand.calibrated else None,
         "tolerance": tol.to_dict(), "seed": seed, "excluded_nodes": list(cand.excluded), "tools": cand.tools},
        art.sha256, digest, started, round(seconds, 3))
    new_art = art.derive(out, step, precision=cand.precision if cand.precision != "auto" else "fp32",
                         target=cand.target, sha256=digest, extra_files=tuple(extra))
    return Report("optimize", new_art, tuple(checks), data, tuple(warnings)), new_art


def best_attempt(attempts: list[dict], checks) -> dict:
    """The most faithful step of an accuracy search (top-1 first, then cosine)."""
    if not attempts:  # a float target: no search, its checks are the result
        return {"attempt": 0, "excluded": [], **worst_metrics(checks)}
    key = lambda a: (a.get("top1_lower", a.get("top1", 1.0)), a.get("top1", 1.0), a.get("cosine", 1.0),  # noqa: E731
                     -len(a.get("excluded", [])))
    best = max(attempts, key=key)
    return {k: best.get(k) for k in ("attempt", "excluded", "top1", "top1_lower", "cosine", "cosine_min_row", "passed",
                                     "latency") if k in best}


def worst_metrics(checks) -> dict:
    """The lowest top-1, top-1 bound and cosines over ``checks`` (the metrics an accuracy goal judges)."""
    worst: dict = {}
    for c in checks:
        for k in ("top1", "top1_lower", "cosine", "cosine_min_row"):
            v = (c.details or {}).get(k)
            if isinstance(v, (int, float)):
                worst[k] = min(worst.get(k, v), v)
    return worst


def _group_cost(attempts: list[dict], node: str) -> dict:
    """The search step that kept ``node`` in float, and what that step's group cost in latency."""
    for a in attempts:
        if any(x.get("node") == node for x in a.get("added", [])):
            out = {"attempt": a["attempt"], "group_size": len(a["added"])}
            if "cost_ms" in a:
                out["group_cost_ms"] = a["cost_ms"]
            return out
    return {}
