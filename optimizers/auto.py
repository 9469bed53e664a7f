"""``cpu-auto``: build the candidates, measure them here, keep the fastest that passes.

Quantization can make a model slower (dynamic int8 convolutions ran 4x slower
than fp32 on an AVX2 CPU), so the choice is measured, never assumed.
"""
from __future__ import annotations

from retool import console
from retool.errors import OptimizationError

#: Calibration methods cpu-auto tries for a static target when none was asked for.
AUTO_METHODS = ("minmax", "percentile", "entropy")
#: Percentile calibration's percentile when an accuracy goal is set and none was asked for.
GOAL_PERCENTILE = 99.99


def choose(profile, ctx):
    """Returns (chosen Candidate, data for the report's ``auto`` section).

    Always measures, whatever ``measure`` says for other targets: choosing without
    measuring is the mistake this target exists to avoid."""
    from retool.optimizers.candidate import build_candidate, check_loads, resolve_tolerance
    from retool.optimizers.targets import get_target

    built, rows, labels = [], [], {}
    if ctx.goal is not None and ctx.percentile is None and not ctx.method:
        # measured (ResNet-18-sized CNN, VNNI): percentile 99.99 kept more top-1 than ORT's 99.999 or minmax
        ctx.percentile = GOAL_PERCENTILE
    for name in profile.candidates:
        sub = get_target(name)
        tol = resolve_tolerance(sub, getattr(ctx, "user_tolerance", None))
        # Static targets try every calibration method unless one was asked for: which one
        # is most faithful depends on the model, and it costs only calibration time.
        methods = [ctx.method] if ctx.method or sub.method != "static" else list(AUTO_METHODS)
        # Under a goal every method's plain build is checked, but only the most faithful one on the
        # calibration probe gets the (costly) search for float nodes: see screen().
        screened = ctx.goal is not None and len(methods) > 1 and ctx.budget > 0
        for method in methods:
            label = name if method in (None, methods[0]) else f"{name}[{method}]"
            try:
                cand = build_candidate(sub, ctx, tol, method=method, budget=0 if screened else None)
                check_loads(cand)
            except OptimizationError as exc:  # said now, not only in the report: the table says "not built"
                rows.append({"target": label, "built": False, "passed": False, "reason": str(exc)})
                console.warn(f"cpu-auto: candidate {label} failed: {exc}")
                continue
            built.append(cand)
            labels[id(cand)] = label
            rows.append(_row(label, cand, tol))
        if screened:
            screen(sub, ctx, tol, built, rows, labels, name)
    if not built:
        raise OptimizationError(f"{ctx.src}: no {profile.name} candidate could be built "
                                f"({'; '.join(r['reason'] for r in rows)})")
    passing = [c for c in built if c.passed]
    lab = lambda c: labels[id(c)]  # noqa: E731
    by_name = {r["target"]: r for r in rows}
    for c in built:
        by_name[lab(c)]["precision"] = c.precision
        by_name[lab(c)]["size_mb"] = _size_mb(c.path)
    lat = None
    choice = None
    if passing:
        lat, chosen, slow, choice = _measure_and_pick(ctx, passing, lab)
        fp32 = lat["variants"]["fp32"]["p50_ms"]
        for c in passing:
            v = lat["variants"][lab(c)]
            by_name[lab(c)].update(p50_ms=v["p50_ms"], p50_ci_ms=v.get("p50_ci_ms"),
                                   ratio=round(v["p50_ms"] / fp32, 4) if fp32 else None,
                                   ratio_vs_fp32=v.get("ratio_vs_fp32"))
        for c in slow:
            _excluded_as_slower(by_name[lab(c)], c, lat, lab(c), ctx, chosen)
        basis = "the calling thread's CPU time" if lat["threads"] == 1 else "wall time"
        why = (f"{choice.reason} (p50 {lat['variants'][lab(chosen)]['p50_ms']:.3f} ms vs fp32 {fp32:.3f} ms at "
               f"batch 1, {lat['threads']} thread(s); decided on {basis})")
        if chosen in slow:
            why += "; it is SLOWER than fp32, but no float candidate passed"
        if len(passing) == 1 and len(built) > 1:  # the others missed: that decided, not a timing
            what = f"the accuracy goal {ctx.goal}" if ctx.goal is not None else "its tolerance"
            found = next((c.extra["precision_bound"]["finding"] for c in built
                          if (c.extra.get("precision_bound") or {}).get("finding")), None)
            why = (f"{lab(chosen)} is the only candidate that meets {what}; the {len(built) - 1} other(s) miss it"
                   + (f" ({found})" if found else ""))
    else:
        chosen = max(built, key=lambda c: min([(x.details or {}).get("cosine", 0) or 0 for x in c.checks] or [0]))
        why = "no candidate meets its tolerance"
    for c in built:
        r = by_name[lab(c)]
        if c is chosen:
            r["reason"] = "chosen: " + why
        elif not c.passed:
            r["reason"] = "misses its tolerance: " + "; ".join(x.message for x in c.checks if not x.passed)[:300]
        elif r.get("slower_than_fp32"):
            r["reason"] = "slower than fp32"
        elif choice is not None and lab(c) in choice.tied:
            r["reason"] = f"tied with {lab(chosen)} within the noise: the higher precision is kept"
        else:
            r["reason"] = f"not decidedly faster than {lab(chosen)}" if lat else f"{lab(chosen)} came first"
    console.info("cpu-auto candidates:\n" + console.table(TABLE_HEADERS, table_rows(rows, lab(chosen))))
    console.info(f"cpu-auto: {why}")
    front = pareto(points(built, lab, lat))
    if front and ctx.goal is not None:
        console.info("cpu-auto: Pareto front (speed-up vs fp32 with its 95% CI, top-1 lower bound):\n"
                     + "\n".join(f"  {p['variant']} step {p['attempt']} ({p['excluded']} node(s) fp32): "
                                  f"{p['speedup_text']}, {p['accuracy_text']}" for p in front))
    return chosen, {"candidates": rows, "chosen": chosen.target, "chosen_variant": lab(chosen), "why": why,
                    "latency": lat, "decision": choice.to_dict() if choice else None, "pareto": front}


def _row(label: str, cand, tol) -> dict:
    return {"target": label, "built": True, "passed": cand.passed, "calibration": cand.method,
            "excluded_nodes": len(cand.excluded), "tolerance": tol.to_dict(),
            "parity": {c.name: {k: (c.details or {}).get(k) for k in PARITY_KEYS if k in (c.details or {})}
                       for c in cand.checks},
            "search": [_step(a) for a in cand.attempts],
            **({"precision_bound": cand.extra["precision_bound"]} if cand.extra.get("precision_bound") else {})}


def _step(a: dict) -> dict:
    """One accuracy-search step as the candidate table keeps it: what was float, what it reached, how fast."""
    d = ((a.get("latency") or {}).get("ratio_vs_fp32") or {}).get("decision") or {}
    out = {k: a[k] for k in ("attempt", "top1", "top1_lower", "cosine", "passed", "stopped") if k in a}
    out["float_nodes"] = len(a.get("excluded", []))
    if d.get("estimate") is not None:
        out["speedup"], out["speedup_ci"] = d["estimate"], d.get("interval")
    return out


def screen(sub, ctx, tol, built: list, rows: list, labels: dict, name: str) -> None:
    """Under a goal: of ``sub``'s plain builds (one per calibration method), the one with the smallest
    output error on the calibration probe (never the held-out rows the goal is judged on) gets the
    accuracy search; the others stay plain. Replaces that candidate in ``built``/``rows`` in place."""
    from retool.optimizers.accuracy import output_error
    from retool.optimizers.candidate import _run_all, build_candidate

    mine = [c for c in built if labels[id(c)].split("[")[0] == name and c.calibrated]
    if not mine or any(c.passed for c in mine):
        return
    err = {}
    for c in mine:
        try:
            err[id(c)] = output_error(ctx.rank_reference(), _run_all(c.path, ctx.rank_feeds(), ctx.threads))
        except Exception:  # a probe that does not run ranks last; the held-out check already judged it
            err[id(c)] = float("inf")
    best = min(mine, key=lambda c: err[id(c)])
    label = labels[id(best)]
    console.info("cpu-auto: calibration probe output error "
                 + ", ".join(f"{labels[id(c)]} {err[id(c)]:.4g}" for c in mine) + f"; searching {label}")
    try:
        cand = build_candidate(sub, ctx, tol, method=best.method)
    except OptimizationError as exc:
        console.warn(f"cpu-auto: the search on {label} failed: {exc}")
        return
    i = built.index(best)
    built[i] = cand
    labels[id(cand)] = label
    j = next(k for k, r in enumerate(rows) if r["target"] == label)
    rows[j] = _row(label, cand, tol)
    for c in mine:
        r = next(r for r in rows if r["target"] == labels[id(c if c is not best else cand)])
        r["probe_error"] = round(err[id(c)], 6)
        r["searched"] = c is best


def points(built: list, lab, lat: dict | None = None) -> list[dict]:
    """Every timed step of every candidate's accuracy search: (speed-up over fp32, agreement).
    A candidate with no search (fp32) is its final measurement."""
    from retool.optimizers.accuracy import _attempt
    from retool.speed import format_decision

    out = []
    for c in built:
        steps = list(c.attempts)
        v = ((lat or {}).get("variants") or {}).get(lab(c))
        if not steps and v:
            steps = [{**_attempt(0, [], [], c.passed, c.checks), "latency": {"ratio_vs_fp32": v.get("ratio_vs_fp32")}}]
        for a in steps:
            dec = ((a.get("latency") or {}).get("ratio_vs_fp32") or {}).get("decision")
            acc = a.get("top1_lower", a.get("top1", a.get("cosine_min_row", a.get("cosine"))))
            if not dec or not isinstance(acc, (int, float)) or not isinstance(dec.get("estimate"), (int, float)):
                continue
            kind = "top1_lower" if "top1_lower" in a else "top1" if "top1" in a else "cosine"
            out.append({"variant": lab(c), "attempt": a["attempt"], "excluded": len(a.get("excluded", [])),
                        "speedup": dec["estimate"], "speedup_ci": dec["interval"], "speedup_text": format_decision(dec),
                        "accuracy": acc, "accuracy_kind": kind, "top1": a.get("top1"), "passed": a.get("passed"),
                        "accuracy_text": f"{kind.replace('_', ' ')} {acc:.4f}"})
    return out


def pareto(pts: list[dict]) -> list[dict]:
    """The steps no other step beats on both speed-up and agreement (ties kept), fastest first.
    Point estimates place the front; each point carries its interval, and the pick stays the rule's."""
    def beats(p, q):
        return (p["speedup"] >= q["speedup"] and p["accuracy"] >= q["accuracy"]
                and (p["speedup"] > q["speedup"] or p["accuracy"] > q["accuracy"]))

    front = [q for q in pts if not any(beats(p, q) for p in pts)]
    return sorted(front, key=lambda p: -p["speedup"])


PARITY_KEYS = ("cosine", "cosine_min_row", "top1", "top1_lower", "max_abs")


def _excluded_as_slower(row: dict, cand, lat: dict, label: str, ctx, chosen) -> None:
    """A passing quantized candidate slower than fp32 beyond the noise: excluded, and said so with the figures."""
    from retool.optimizers.latency import slower_verdict

    row["slower_than_fp32"] = True
    v = lat["variants"][label]
    d = (v.get("ratio_vs_fp32") or {}).get("decision")
    if not d:
        return
    verdict = slower_verdict(d, name=label, precision=cand.precision, method=getattr(cand.profile, "method", None),
                             fp32_p50_ms=lat["variants"]["fp32"]["p50_ms"], cand_p50_ms=v["p50_ms"],
                             threads=lat["threads"], cpu=ctx.here)
    row["speed_vs_fp32"] = verdict
    if verdict.get("warning") and cand is not chosen:
        console.warn(f"cpu-auto: excluded {verdict['warning']}")


#: extra seconds of timing while candidates are tied within the noise
DECIDE_BUDGET_S = 5.0
_RANK = {"fp32": 0, "fp16": 1, "bf16": 1}
TABLE_HEADERS = ["candidate", "precision", "p50 ms (95% CI)", "speed-up vs fp32", "size MB", "parity", "result"]


def _size_mb(path) -> float | None:
    try:
        from retool.fsutil import file_size

        return round(file_size(path, ()) / 1e6, 4)
    except OSError:
        return None


def _measure_and_pick(ctx, passing, lab):
    """Time the passing candidates with fp32; while the pick is tied within the noise, time more
    (up to ``DECIDE_BUDGET_S``, or ``ctx.decide_budget_s``), then keep the higher precision."""
    import time

    from retool.optimizers import latency

    models = {"fp32": ctx.src, **{lab(c): c.path for c in passing}}
    budget = float(getattr(ctx, "decide_budget_s", None) or DECIDE_BUDGET_S)
    with console.step(f"measuring {len(passing)} candidate(s) against fp32 (batch 1, {ctx.threads} threads)"):
        lat, samples = latency.measure(models, ctx.heldout[0], threads=ctx.threads, with_samples=True)
    threads = lat["threads"]
    chosen, slow, choice = pick(passing, latency.judged(samples, threads), lab)
    t0, extra = time.monotonic(), 0.0
    if choice.tied and budget > 0:
        with console.step(f"{', '.join(choice.tied)} tied with {choice.name} within the noise: timing more "
                          f"(up to {budget:g} s)"):
            while choice.tied and time.monotonic() - t0 < budget:
                _, more = latency.measure(models, ctx.heldout[0], threads=threads, with_samples=True,
                                          budget_s=min(2.0, budget), warmup=2)
                for kind in ("wall", "cpu"):
                    for k, v in more[kind].items():
                        samples[kind][k].extend(v)
                chosen, slow, choice = pick(passing, latency.judged(samples, threads), lab)
                extra = time.monotonic() - t0
    if extra:
        lat = latency.summarize_times(samples["wall"], samples["cpu"], threads)
    lat["extra_timing_s"] = round(extra, 3)
    return lat, chosen, slow, choice


def pick(passing: list, times: dict, label):
    """The fastest passing candidate by the one rule (retool.speed.choose_fastest) on paired
    per-round times (``times``: label -> ms per round, with "fp32"): a lower precision wins only
    when decidedly faster; ties keep the higher precision. Never an int8 one slower than fp32
    beyond the noise while a float one passes. Returns (chosen, rejected as slower, Choice)."""
    from retool import speed
    from retool.validators.decide_gates import NOT_SLOWER_THRESHOLD

    slow = [c for c in passing if c.precision != "fp32" and "fp32" in times
            and speed.decide_ratio(times["fp32"], times[label(c)], NOT_SLOWER_THRESHOLD).outcome == speed.FAIL]
    keep = [c for c in passing if c not in slow] or passing
    order = sorted(keep, key=lambda c: _RANK.get(c.precision, 2))  # stable: build order within a precision
    choice = speed.choose_fastest({label(c): times[label(c)] for c in order}, [label(c) for c in order])
    chosen = next(c for c in order if label(c) == choice.name)
    return chosen, slow, choice


def table_rows(rows: list[dict], chosen: str) -> list[list]:
    """The candidate table cpu-auto prints: latency with its interval, size, parity, and the outcome."""
    out = []
    for r in rows:
        ci = r.get("p50_ci_ms")
        lat = f"{r['p50_ms']:.3f} ({ci[0]:.3f}–{ci[1]:.3f})" if r.get("p50_ms") is not None and ci else ""
        dec = (r.get("ratio_vs_fp32") or {}).get("decision")
        vs = ""
        if dec:
            from retool.speed import format_decision

            vs = format_decision(dec)
        par = r.get("parity") or {}
        cos = [v.get("cosine") for v in par.values() if isinstance(v, dict) and v.get("cosine") is not None]
        top = [v.get("top1") for v in par.values() if isinstance(v, dict) and v.get("top1") is not None]
        low = [v.get("top1_lower") for v in par.values() if isinstance(v, dict) and v.get("top1_lower") is not None]
        ptxt = ", ".join(([f"cos {min(cos):.5f}"] if cos else []) + ([f"top1 {min(top):.3f}"] if top else [])
                         + ([f"(lower bound {min(low):.3f})"] if low else []))
        result = ("chosen" if r["target"] == chosen else "not built" if not r.get("built") else
                  "misses tolerance" if not r.get("passed") else (r.get("reason") or "").split(":")[0])
        out.append([r["target"], r.get("precision", ""), lat, vs,
                    f"{r['size_mb']:.3f}" if r.get("size_mb") is not None else "", ptxt, result])
    return out
