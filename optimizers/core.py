"""``optimize``: one ONNX model in, one optimised artifact and its report out.

Everything is built in a staging folder beside the output; the model reaches
``output`` only once it loads in onnxruntime and meets the target's tolerance.
"""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Sequence

from retool import console
from retool.errors import UsageError, ValidationFailed, first_line
from retool.optimizers.artifact import external_names, finalize, load_input, set_metadata
from retool.optimizers.candidate import Context, build_candidate, check_loads, resolve_tolerance
from retool.types import CheckResult, ModelArtifact, Report, now_iso

#: one-line error text; this module keeps its own length limit
_first_line = partial(first_line, limit=200)


def optimize(model, output, *, target: str, calibration=None, calibration_method: str | None = None,
             tolerance=None, seed: int = 0, threads: int | None = None, measure: bool = True,
             accuracy_budget: int | None = None, preprocess: str | None = None,
             tune_for=None, percentile: float | None = None, calibration_samples: int | None = None,
             accuracy=None, heldout: int | None = None) -> tuple[ModelArtifact, Report]:
    """Optimise ``model`` (path or ModelArtifact) for ``target`` and write it to ``output``.

    Raises UsageError (2) for bad input, OptimizationError (5) when a step fails,
    ValidationFailed (6) when the tolerance is still not met after the accuracy
    budget; then nothing is written at ``output`` (only the sidecar report).
    ``tune_for``: the CPU the int8 choices are made for (see optimizers.hardware.resolve);
    default this one. ``calibration_method`` None: minmax (cpu-auto tries minmax, percentile
    and entropy). ``accuracy``: a goal such as "top1>=0.97,cos>=0.999" (optimizers.goal); the
    fastest artifact that meets it is kept, and exit 6 when none does. ``heldout``: held-out
    samples for the parity check (default about 20 %, at most 32; a top-1 goal holds out what it needs).
    """
    from retool.fsutil import atomic_write_text, check_output_path, sha256_file
    from retool.onnx_info import sidecar_report_path
    from retool.optimizers import hardware, latency
    from retool.optimizers.accuracy import DEFAULT_BUDGET
    from retool.optimizers.calibration import open_calibration
    from retool.optimizers.quantize import METHODS
    from retool.optimizers.targets import get_target

    started, t_start = now_iso(), time.perf_counter()
    profile = get_target(target)
    if calibration_method is not None and calibration_method not in METHODS:
        raise UsageError(f"--calibration-method {calibration_method!r}: use one of {', '.join(METHODS)}")
    if percentile is not None and not 50.0 < float(percentile) <= 100.0:
        raise UsageError(f"--percentile {percentile}: give a percentile above 50 and at most 100, e.g. 99.99")
    if percentile is not None and calibration_method not in (None, "percentile"):
        raise UsageError(f"--percentile is for --calibration-method percentile, not {calibration_method}")
    if percentile is not None:
        calibration_method = "percentile"
    from retool.optimizers.goal import parse_goal

    goal = parse_goal(accuracy)
    if goal is not None:
        base_tol = tolerance.to_dict() if hasattr(tolerance, "to_dict") else dict(tolerance or {})
        tolerance = {**base_tol, **goal.tolerance_overrides()}
    art = load_input(model)
    out = check_output_path(output)
    if out.resolve() == Path(art.path).resolve():
        raise UsageError(f"{out}: output is the input model; choose another -o")
    tol = resolve_tolerance(profile, tolerance)
    tuned = hardware.resolve(tune_for)
    threads = threads or latency.default_threads()
    budget = DEFAULT_BUDGET if accuracy_budget is None else int(accuracy_budget)
    from retool.optimizers import decoder

    if profile.method != "weight_only" and decoder.is_decoder(art):
        raise UsageError(f"{art.path}: is a decoder with a KV cache; random inputs cannot check it, so {profile.name} "
                         f"is not offered for it: use --target cpu-int4 or cpu-int8-weight (gated on generation)")
    if profile.method == "weight_only":
        if decoder.is_decoder(art):  # gated on generation, not on one forward of random data
            return decoder.optimize_decoder(art, out, profile, tol, seed=seed, threads=threads, measure=measure,
                                            started=started, t_start=t_start)
        if tolerance is None:  # the profile's limits are a decoder's generation gate; outputs get int8's
            from retool.validators.parity import DEFAULT_TOLERANCES

            tol = DEFAULT_TOLERANCES["int8"]
    calib = open_calibration(calibration, art.inputs, seed=seed, preprocess=preprocess,
                             max_samples=calibration_samples, heldout=heldout,
                             goal_heldout=goal.rows_needed() if goal else 0)
    needs_calibration = profile.method == "static" or (profile.method == "auto" and any(
        get_target(c).method == "static" for c in profile.candidates))
    if calib.random and needs_calibration:
        console.warn(calib.warnings[0])

    with staging_dir_for(out) as wd:
        ctx = Context(art, wd, calib, calibration_method, tol, seed, threads, budget)
        ctx.user_tolerance = tolerance
        ctx.cpu, ctx.percentile, ctx.goal, ctx.measure = tuned, percentile, goal, measure
        from retool.optimizers.goal import check_showable

        check_showable(goal, ctx.reference, ctx.output_names, art.path,
                       "random" if calib.random or not calib.heldout_items else "data")
        if profile.method == "auto":
            from retool.optimizers.auto import choose

            cand, auto_data = choose(profile, ctx)
        else:
            cand, auto_data = build_candidate(profile, ctx, tol), None
            check_loads(cand)

        lat = None
        chosen_label = (auto_data or {}).get("chosen_variant", cand.target)
        if auto_data is not None and auto_data.get("latency") and chosen_label in auto_data["latency"]["variants"]:
            lat = _ratio(auto_data["latency"], chosen_label)  # measured with the other candidates already
        elif measure and cand.passed:
            try:
                with console.step(f"measuring latency (batch 1, {threads} threads, interleaved with fp32)"):
                    lat = _latency(art.path, cand.path, ctx.heldout[0], threads)
            except Exception as exc:  # a measurement problem must not discard a good model
                cand.warnings.append(f"latency not measured ({_first_line(exc)})")
        if lat and cand.precision != "fp32":  # slower beyond the noise: said here, with the likely reasons
            latency.record_speed(cand, profile.name, lat, ctx.here, auto_data is not None)
        sweep = None
        if measure and cand.passed and profile.provider == "CPUExecutionProvider":
            try:
                with console.step("measuring at 1 and at all threads"):
                    sweep = latency.thread_sweep(art.path, cand.path, ctx.heldout[0])
                cand.extra["threads"] = sweep
            except Exception as exc:
                cand.warnings.append(f"thread sweep not measured ({_first_line(exc)})")
        staged = wd / out.name
        finalize(cand.path, staged)
        if sweep:
            set_metadata(staged, {latency.THREADS_KEY: str(sweep["best_intra_op_threads"])})
        digest = sha256_file(staged)
        extra = external_names(staged)
        from retool.optimizers.report import build_report

        report, new_art = build_report(art, profile, cand, ctx, tol, lat, auto_data, staged, out, digest, extra,
                                       started, time.perf_counter() - t_start, cand.method, seed,
                                       needs_calibration)
        side = sidecar_report_path(out)
        if not cand.passed:
            atomic_write_text(side, report.to_json())
            failed = [c for c in report.failed_checks]
            if ctx.goal is not None:
                raise ValidationFailed(
                    f"{art.path}: accuracy goal {ctx.goal} cannot be met with {profile.name}: best reached "
                    f"{_reached(report.data['accuracy_goal']['best_reached'])}{_why_bound(cand)}; {out} was not written "
                    f"(report: {side}); relax --accuracy, raise --accuracy-budget"
                    f"{', give representative --calibration data' if cand.calibrated else ''} or choose another "
                    f"--target", report=report)
            raise ValidationFailed(
                f"{art.path}: {profile.name} result misses its tolerance ({_why(failed)}) after keeping "
                f"{len(cand.excluded)} node(s) in float; {out} was not written (report: {side}); "
                f"relax --tolerance{', give representative --calibration data' if cand.calibrated else ''} "
                f"or choose another --target", report=report)
        from retool.fsutil import move_onnx

        move_onnx(staged, out)
    atomic_write_text(sidecar_report_path(out), report.to_json())
    return new_art, report


def _reached(best: dict) -> str:
    parts = [f"{k.replace('_', ' ')} {best[k]:.6g}" for k in ("top1", "top1_lower", "cosine", "cosine_min_row")
             if isinstance(best.get(k), (int, float))]
    return f"{', '.join(parts) or 'nothing measurable'} with {len(best.get('excluded', []))} node(s) in fp32"


def _why_bound(cand) -> str:
    finding = (cand.extra.get("precision_bound") or {}).get("finding")
    return f" ({finding})" if finding else ""


def staging_dir_for(out: Path):
    from retool.fsutil import staging_dir

    return staging_dir(out)


def _latency(fp32_path, cand_path, feeds, threads) -> dict:
    from retool.optimizers import latency

    return _ratio(latency.measure({"fp32": fp32_path, "candidate": cand_path}, feeds, threads=threads), "candidate")


def _ratio(m: dict, label: str) -> dict:
    """The latency section: p50s and the speed-up over fp32 (fp32 p50 / candidate p50, > 1 faster)."""
    from retool.speed import stats

    f, c = m["variants"]["fp32"]["p50_ms"], m["variants"][label]["p50_ms"]
    sp = (m.get("speedup_vs_fp32") or {}).get(label) or stats(f / c if c else float("inf"), None, m["rounds"])
    return {"threads": m["threads"], "batch": 1, "fp32_p50_ms": f, "candidate_p50_ms": c,
            "speedup": sp["speedup"], "speedup_iqr": sp["iqr"], "speedup_verdict": sp["verdict"],
            "speedup_text": sp["text"], "ratio_vs_fp32": m["variants"][label].get("ratio_vs_fp32"),
            "rounds": m["rounds"], "spinning": False, "variants": m["variants"]}


def _why(failed: Sequence[CheckResult]) -> str:
    return "; ".join(f"{c.name}: {c.message}" for c in failed[:2]) or "parity"
