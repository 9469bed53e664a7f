"""The units of work a pipeline runs: convert one model; optimise+validate one target.

They run in worker processes (or Ray tasks), take and return plain data, and never
raise for a known error: the outcome carries the exit code and the one-line message.
"""
from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from retool.errors import RetoolError
from retool.fsutil import inside
from retool.pipeline.config import ModelConfig, TargetConfig


def _resolve(path: str | None, base: Path) -> str | None:
    """A path relative to the pipeline file; ``file.py:factory`` too (its file part)."""
    if path is None:
        return None
    file, sep, attr = path.rpartition(":")
    if sep and file.endswith(".py") and "/" not in attr:
        return f"{_resolve(file, base)}:{attr}"
    p = Path(path)
    return str(p if p.is_absolute() or not (base / p).exists() else base / p)


def _importable(ref: str | None, base: Path) -> None:
    """``package.module:factory`` resolves from the pipeline file's folder (or the nearest parent
    holding ``package``) as well as from the current folder."""
    from retool.refs import ensure_importable, package_root

    root = package_root(ref, base) if ref else None
    ensure_importable(*([root] if root else []), base, os.getcwd())


def _outcome(stage: str, started: float, **kw) -> dict:
    return {"stage": stage, "status": "ok", "code": 0, "message": "", "seconds": round(time.perf_counter() - started, 3), **kw}


def _failure(stage: str, started: float, exc: BaseException) -> dict:
    if isinstance(exc, RetoolError):
        return _outcome(stage, started, status="failed", code=exc.exit_code, message=str(exc))
    return _outcome(stage, started, status="failed", code=1,
                    message=f"unexpected {type(exc).__name__}: {exc}", traceback=traceback.format_exc())


def _maybe_fault(model: str, stage: str) -> None:
    # Fault injection for the worker-retry test: RETOOL_FAULT_INJECT=model:stage:markerfile kills
    # the worker once (the marker file records that it happened).
    spec = os.environ.get("RETOOL_FAULT_INJECT")
    if not spec:
        return
    m, s, marker = spec.split(":", 2)
    if m == model and s == stage and not Path(marker).exists():
        Path(marker).write_text("died once")
        os._exit(17)


def convert_job(model: ModelConfig, base_dir: str, out_dir: str, seed: int = 0) -> dict:
    from retool import console

    with console.labelled(model.name):  # every step line names its model
        return _convert_job(model, base_dir, out_dir, seed)


def _convert_job(model: ModelConfig, base_dir: str, out_dir: str, seed: int = 0) -> dict:
    from retool import console
    from retool.converter.core import convert

    console.info(f"• {model.name}: convert started")
    t0 = time.perf_counter()
    base = Path(base_dir)
    _importable(model.source, base)  # `package.module:factory` sources resolve like `python -m`, from the file
    out = inside(out_dir, f"{model.name}/fp32.onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        _maybe_fault(model.name, "convert")
        art, rep = convert(_resolve(model.source, base) or model.source, out, framework=model.framework,
                           weights=_resolve(model.weights, base), inputs=model.inputs,
                           example_inputs=_resolve(model.example_inputs, base), opset=model.opset,
                           trust_remote_code=model.trust_remote_code, options=model.options, seed=seed)
    except BaseException as exc:  # noqa: BLE001 - reported, not raised: one model must not sink the others
        if isinstance(exc, KeyboardInterrupt):
            raise
        return _failure("convert", t0, exc)
    return _outcome("convert", t0, path=str(out), sha256=art.sha256, report=str(out.with_name("fp32.report.json")),
                    exporter=rep.data.get("exporter"))


def target_job(model: ModelConfig, target: TargetConfig, fp32_path: str, base_dir: str, out_dir: str,
               seed: int = 0, reuse_optimize: Mapping[str, Any] | None = None) -> dict:
    """Optimise for one target, then validate it against the fp32 model (or the source).

    ``reuse_optimize`` is the cached outcome of an identical optimisation: only validation runs.
    """
    from retool import console

    with console.labelled(f"{model.name}/{target.name}"):  # every step line names its model and target
        return _target_job(model, target, fp32_path, base_dir, out_dir, seed, reuse_optimize)


def _target_job(model: ModelConfig, target: TargetConfig, fp32_path: str, base_dir: str, out_dir: str,
                seed: int = 0, reuse_optimize: Mapping[str, Any] | None = None) -> dict:
    from retool import console
    from retool.optimizers.core import optimize

    console.info(f"• {model.name}/{target.name}: target started")
    t0 = time.perf_counter()
    base = Path(base_dir)
    tdir = inside(out_dir, f"{model.name}/{target.name}")
    tdir.mkdir(parents=True, exist_ok=True)
    out = tdir / "model.onnx"
    result: dict[str, Any] = {"target": target.name}
    if reuse_optimize and out.exists():
        result["optimize"] = {**reuse_optimize, "status": "cached", "seconds": 0.0, "path": str(out),
                              "report": str(tdir / "model.report.json")}
        return _validate_into(result, model, target, out, fp32_path, base, tdir, seed)
    try:
        _maybe_fault(model.name, target.name)
        cal = dict(target.calibration)
        art, orep = optimize(fp32_path, out, target=target.spec, calibration=_resolve(cal.get("data"), base),
                             calibration_method=cal.get("method"), preprocess=cal.get("preprocess"),
                             tolerance=dict(target.tolerance) or None, seed=seed, percentile=cal.get("percentile"),
                             calibration_samples=cal.get("samples"), accuracy=target.accuracy,
                             heldout=cal.get("heldout"))
        result["optimize"] = _outcome("optimize", t0, path=str(out), sha256=art.sha256,
                                      report=str(tdir / "model.report.json"))
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        result["optimize"] = _failure("optimize", t0, exc)
        return result
    return _validate_into(result, model, target, out, fp32_path, base, tdir, seed)


def _validate_into(result: dict, model: ModelConfig, target: TargetConfig, out: Path, fp32_path: str,
                   base: Path, tdir: Path, seed: int) -> dict:
    from retool.validators.core import validate, write_reports

    t1 = time.perf_counter()
    try:
        v = dict(model.validation)
        reference = fp32_path if v.get("reference", "fp32") == "fp32" else _resolve(model.source, base)
        if reference != fp32_path:
            _importable(model.source, base)
        vrep = validate(out, reference, batch_sizes=tuple(v.get("batch_sizes", (1,))),
                        latency=v.get("latency", True), threads=v.get("threads"), gates=dict(target.gates) or None,
                        framework="onnx" if reference == fp32_path else model.framework,
                        inputs=model.inputs, trust_remote_code=model.trust_remote_code, seed=seed,
                        runs=v.get("runs"), time_budget_s=v.get("min_time_s"))
        paths = write_reports(vrep, tdir / "report")
        result["validate"] = _outcome("validate", t1, report=str(paths["json"]),
                                      passed=vrep.passed, reports=[str(p) for p in paths.values()],
                                      summary=_summary_numbers(vrep))
        if not vrep.passed:
            failed = ", ".join(c.name for c in vrep.failed_checks)
            result["validate"].update(status="failed", code=6, message=f"gate failed: {failed}")
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        result["validate"] = _failure("validate", t1, exc)
    return result


def _summary_numbers(report) -> dict:
    """The figures of the summary line, at the worst batch size (lowest speed-up), not just the first."""
    from retool.speed import worst

    data = report.data or {}
    lat = (data.get("latency") or {})
    cand = (lat.get("candidate") or {})
    stats = lat.get("speedup_stats") or lat.get("speedup") or {}
    w = worst(stats)
    batch = w[0] if w else next(iter(sorted(cand, key=int)), None)
    at = cand.get(batch, {}) if batch is not None else {}
    entry = w[1] if w else None
    return {"decision": _gate_decision(report, batch), "machine_busy": bool((data.get("machine") or {}).get("busy")),
            "p50_ms": at.get("p50_ms"), "p99_ms": at.get("p99_ms"), "batch": int(batch) if batch else None,
            "batches": len(cand),
            "speedup": entry.get("speedup") if isinstance(entry, dict) else entry,
            "speedup_stats": entry if isinstance(entry, dict) else None,
            "off_target": lat.get("off_target"),
            "size_mb": data.get("size_mb")}


def _gate_decision(report, batch) -> dict | None:
    """The speed-up or not-slower gate's decision at ``batch`` (interval, outcome), for the summary."""
    if batch is None:
        return None
    for c in getattr(report, "checks", ()):
        if c.severity == "gate" and c.name in (f"speedup@batch{batch}", f"not-slower@batch{batch}"):
            d = (c.details or {}).get("decision")
            if d:
                return {**d, "gate": c.name.split("@")[0], "raw_outcome": (c.details or {}).get("outcome")}
    return None
