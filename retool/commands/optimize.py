"""retool optimize / retool targets."""
from __future__ import annotations

import click

from retool.commands.common import (COSINE, FRACTION, PERCENTILE, SAMPLES, SEED, THREADS, TOLERANCE, Number,
                                    emit_report, raise_if_output_disk_full)


@click.command("optimize")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the optimised ONNX.")
@click.option("--target", required=True, help="Target profile (see 'retool targets'), e.g. cpu-int8.")
@click.option("--calibration", type=click.Path(), help="Calibration data: an .npz (array per input), a folder "
              "of .npy/.npz, or a folder of images. Without it, seeded random data (with a warning).")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default=None,
              help="How activation ranges are chosen (default minmax; cpu-auto tries all three).")
@click.option("--percentile", type=PERCENTILE, metavar="P", help="Percentile calibration's percentile, e.g. 99.99 "
              "(implies --calibration-method percentile; ORT's default 99.999).")
@click.option("--calibration-samples", type=SAMPLES, metavar="N",
              help="Use at most N calibration samples (default 512); the report says how many were used.")
@click.option("--heldout", type=SAMPLES, metavar="N", help="Hold out N samples for the parity check (default about "
              "20 %, at most 32; a top-1 --accuracy goal holds out the count it needs, up to half the data).")
@click.option("--accuracy", metavar="GOAL", help="Accuracy goal on held-out samples, e.g. 'top1>=0.97,cos>=0.999': "
              "keeps the fastest artifact that meets it (nodes fall back to fp32 as needed); exit 6 if none does.")
@click.option("--preprocess", metavar="SPEC", help="For image folders: 'resize=H,W;mean=..;std=..;layout=nchw;"
              "scale=1/255;color=rgb' (default: the model's size, /255, RGB).")
@click.option("--tolerance", metavar="KEY=VAL,...", help="Override the target's parity tolerance, e.g. "
              "'min_cosine=0.995,min_top1=0.98' (keys: atol, rtol, min_cosine, min_top1; 'none' disables one).")
@click.option("--accuracy-budget", type=Number(int, 0, 20), default=None,
              help="Retries of the accuracy-aware fallback (default 4; 0 = no fallback).")
@click.option("--threads", type=THREADS, help="Threads for the latency measurement (default min(4, cores)).")
@click.option("--no-measure", is_flag=True, help="Skip the latency measurement.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of random calibration/held-out data.")
@click.option("--tune-for", default="here", show_default=True, metavar="CPU",
              help="The CPU the int8 choices are made for: here, x86-avx2, x86-avx512, x86-vnni, arm64-dotprod, "
                   "or a cpuinfo file. The report says when it differs from this CPU.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a summary.")
def optimize_cmd(model, output, target, calibration, calibration_method, percentile, calibration_samples, heldout,
                 accuracy, preprocess, tolerance, accuracy_budget, threads, no_measure, seed, tune_for, as_json):
    """Optimise the ONNX MODEL for --target and write it to -o.

    Checks parity against MODEL on held-out samples and measures latency at
    batch 1. When the target's tolerance is missed, the nodes that cost the most
    accuracy are kept in float and it retries; if it still misses, nothing is
    written at -o and the sidecar report says why (exit 6).
    """
    from retool import console
    from retool.errors import OptimizationError, ValidationFailed
    from retool.optimizers.core import optimize

    tol = parse_tolerance(tolerance)
    try:
        art, report = optimize(model, output, target=target, calibration=calibration,
                               calibration_method=calibration_method, tolerance=tol, seed=seed, threads=threads,
                               measure=not no_measure, accuracy_budget=accuracy_budget, preprocess=preprocess,
                               tune_for=tune_for, percentile=percentile, calibration_samples=calibration_samples,
                               accuracy=accuracy, heldout=heldout)
    except ValidationFailed as exc:
        if exc.report is not None:
            emit_report(exc.report, as_json, console.checks_table(exc.report.checks))
        raise
    except OptimizationError as exc:  # a full disk at -o is the output's problem, not the model's
        raise_if_output_disk_full(output, exc, 2 * _size(model))
        raise
    emit_report(report, as_json, summary(report))


def _size(path) -> int:
    from pathlib import Path

    p = Path(path)
    return sum(f.stat().st_size for f in p.parent.glob(p.name + "*") if f.is_file()) if p.is_file() else 0


def summary(report) -> str:
    from retool import console

    d = report.data
    lines = [console.checks_table([c for c in report.checks if c.name.startswith("parity")]), ""]
    lat = d.get("latency") or {}
    rows = [["target", d.get("chosen_target") if d.get("chosen_target") != d.get("target")
             else d.get("target")], ["size", f"{d['size_mb_input']:.3f} MB -> {d['size_mb']:.3f} MB"]]
    if d.get("chosen_target") != d.get("target"):
        rows[0][1] = f"{d['target']} -> {d['chosen_target']} ({d['auto']['why']})"
    if lat:
        from retool.speed import format_speedup

        rows.append(["latency", f"{lat['fp32_p50_ms']:.3f} ms -> {lat['candidate_p50_ms']:.3f} ms: "
                                f"{format_speedup(lat['speedup'], lat.get('speedup_iqr'), lat.get('speedup_verdict'))}"
                                f" vs fp32 (batch 1, {lat['threads']} threads)"])
        if lat.get("off_target"):
            rows.append(["", lat["off_target"]])
    cal = d.get("calibration") or {}
    if cal.get("used"):
        rows.append(["calibration", f"{cal['source']} ({cal['samples']} samples, {cal['method']})"
                                    + (" RANDOM" if cal.get("random") else "")])
    goal = d.get("accuracy_goal")
    if goal:
        best = goal.get("best_reached") or {}
        got = ", ".join(f"{k.replace('_', ' ')} {best[k]:.4f}" for k in ("top1", "top1_lower", "cosine")
                        if isinstance(best.get(k), (int, float)))
        rows.append(["accuracy goal", f"{goal['text']}: {'met' if goal['met'] else 'NOT met'} ({got}, "
                                      f"{goal['heldout_samples']} held-out samples)"])
    if d.get("excluded_nodes"):
        rows.append(["kept in float", ", ".join(
            f"{x['node']} ({x['source_layer']}" + (f", group +{x['group_cost_ms']:.3f} ms" if "group_cost_ms" in x else "")
            + ")" for x in d["excluded_layers"])])
    lines.append(console.table(["result", ""], rows))
    lines.append(f"\nwrote {report.artifact.path}")
    for w in report.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


#: the range of each tolerance key, shared with the pipeline file
TOLERANCE_KEYS = {"atol": TOLERANCE, "rtol": TOLERANCE, "min_cosine": COSINE, "min_top1": FRACTION}


def parse_tolerance(text: str | None) -> dict | None:
    from retool.errors import UsageError

    if not text:
        return None
    out = {}
    for part in text.split(","):
        key, sep, val = part.strip().partition("=")
        key = key.strip().replace("-", "_")
        if key not in ("atol", "rtol", "min_cosine", "min_top1") or not sep:
            raise UsageError(f"--tolerance {text!r}: expected KEY=VALUE pairs with keys atol, rtol, min_cosine, "
                             f"min_top1, e.g. 'min_cosine=0.995,min_top1=0.98'")
        out[key] = None if val.strip().lower() in ("none", "off") else TOLERANCE_KEYS[key].check(val, f"--tolerance {key}")
    return out


#: how execution providers are spelled for people ("Tensorrt" is onnxruntime's class name, not the product)
_PROVIDER_NAMES = {"TensorrtExecutionProvider": "TensorRT", "CUDAExecutionProvider": "CUDA",
                   "CPUExecutionProvider": "CPU", "OpenVINOExecutionProvider": "OpenVINO",
                   "DmlExecutionProvider": "DirectML", "CoreMLExecutionProvider": "CoreML"}


def provider_name(provider: str) -> str:
    return _PROVIDER_NAMES.get(provider, provider.replace("ExecutionProvider", ""))


@click.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def targets_cmd(as_json):
    """List the optimisation targets and what each does."""
    import json

    from retool import console
    from retool.optimizers.targets import all_targets

    profiles = all_targets()
    if as_json:
        click.echo(json.dumps([{**p.to_dict(), "does": p.describe()} for p in profiles], indent=2))
        return
    rows = [[p.name, p.precision, provider_name(p.provider), p.describe()] for p in profiles]
    click.echo(console.table(["target", "precision", "provider", "what it does"], rows))
