"""``convert``: load a source model, export ONNX, prove it, then move it into place."""
from __future__ import annotations

import dataclasses
import errno
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from retool import console
from retool.converter.base import ConvertRequest, SourceModel
from retool.converter.source_parity import first_line_of as _first_line
from retool.converter.source_parity import index_hint as _index_hint
from retool.errors import ConversionError, RetoolError, UsageError, ValidationFailed
from retool.fsutil import atomic_write_text, check_output_path, move_onnx, sha256_file, staging_dir
from retool.registry import CONVERTERS
from retool.types import CheckResult, ModelArtifact, ProvenanceStep, Report, TensorSpec, now_iso

#: Exporter facts a serving client needs, copied from the export params into the report's data.
REPORTED_PARAMS = ("output_names_source", "static_batch", "batch_range", "verified_batch_sizes")


def is_callable_ref(text: str) -> bool:
    """``package.module:factory`` or ``path/file.py:factory`` (and not an existing path)."""
    return bool(re.fullmatch(r"[\w./-]+(\.py)?:[A-Za-z_][\w.]*", text)) and not Path(text).exists()


def detect_framework(source: Any, framework: str = "auto") -> str:
    """The framework for ``source``; with ``auto`` every registered converter sniffs it."""
    if framework != "auto":
        CONVERTERS.get(framework)  # unknown names fail with the known list
        return framework
    if isinstance(source, (str, Path)) and not is_callable_ref(str(source)) and not Path(source).exists():
        raise UsageError(f"{source}: model file not found")
    hits = []
    for name in CONVERTERS:
        reason = CONVERTERS.get(name).sniff(source)
        if reason:
            hits.append((name, reason))
    if len(hits) == 1:
        return hits[0][0]
    label = source if isinstance(source, (str, Path)) else type(source).__name__
    if not hits:
        if isinstance(source, (str, Path)) and str(source).endswith(".py"):  # code, not a model file
            names = _factory_names(Path(source))
            eg = ", ".join(f"{source}:{n}" for n in names[:3]) or f"{source}:factory"
            raise UsageError(f"{label}: a Python file is code, not a model; name the function that builds the "
                             f"model, e.g. {eg}")
        raise UsageError(f"{label}: cannot tell which framework this model is from; "
                         f"pass --framework ({', '.join(CONVERTERS.names())})")
    considered = "; ".join(f"{n}: {r}" for n, r in hits)
    raise UsageError(f"{label}: ambiguous source ({considered}); pass --framework")


def _factory_names(path: Path) -> list[str]:
    """Top-level functions and classes of a .py file, read with ast (the file is not run)."""
    import ast

    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]


def _other_framework_hint(source: Any, chosen: str) -> str | None:
    for name in CONVERTERS:
        if name != chosen:
            reason = CONVERTERS.get(name).sniff(source)
            if reason:
                return f"it looks like a {name} model ({reason}): use --framework {name} or auto"
    return None


def convert(source: Any, output, *, framework: str = "auto", weights=None,
            inputs: Sequence[TensorSpec | str] = (), example_inputs: Mapping | str | Path | None = None,
            opset: int | None = None, trust_remote_code: bool = False, verify: bool = True,
            tolerance=None, options: Mapping[str, Any] | None = None, seed: int = 0,
            write_report: bool = True) -> tuple[ModelArtifact, Report]:
    """Convert ``source`` to ONNX at ``output``; verify parity unless ``verify=False``.

    Returns (artifact, report). Raises ValidationFailed (exit 6) when parity fails:
    the ONNX file is then not written to ``output``; only the sidecar report is.
    """
    from retool.inputs import load_npz, parse_specs

    out = check_output_path(output)
    if weights is not None and not Path(weights).exists():
        raise UsageError(f"{weights}: weights file not found")
    specs = parse_specs(inputs)
    examples = load_npz(example_inputs) if isinstance(example_inputs, (str, Path)) else example_inputs
    if opset is not None and not 7 <= int(opset) <= 25:
        raise UsageError(f"--opset {opset}: choose an opset between 7 and 25 (tf2onnx supports 13-18, torch.onnx 18 and up)")
    fw = detect_framework(source, framework)
    converter = CONVERTERS.get(fw)
    request = ConvertRequest(source, out, fw, Path(weights) if weights else None, specs,
                             dict(examples) if examples is not None else None, opset, trust_remote_code,
                             dict(options or {}), seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with console.step(f"loading {fw} model {request.source_label}"):
        try:
            model = converter.load(request)
        except ConversionError as exc:
            hint = _other_framework_hint(source, fw) if framework != "auto" else None
            if hint:
                raise ConversionError(f"{exc}; {hint}") from None
            raise
    timings["load_s"] = time.perf_counter() - t0
    if fw == "torch" and hasattr(model, "module"):  # ids inside the smallest embedding table
        from retool.input_ranges import source_high, with_ranges

        model.input_specs = with_ranges(model.input_specs, None, source_high(model.module))
    try:
        return _convert_loaded(model, request, out, verify, tolerance, timings, write_report)
    except OSError as exc:  # writing the staged copy (a full disk ...); anything else is a bug
        _raise_if_output_failed(exc, out)
        raise
    finally:
        model.close()


def _source_digest(model: SourceModel, request: ConvertRequest) -> str | None:
    files = [Path(f) for f in model.source_files if Path(f).exists()]
    if not files:
        return None
    if len(files) == 1:
        return sha256_file(files[0])
    import hashlib

    h = hashlib.sha256()
    for f in files:
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


def _convert_loaded(model: SourceModel, request: ConvertRequest, out: Path, verify: bool, tolerance,
                    timings: dict, write_report: bool) -> tuple[ModelArtifact, Report]:
    from retool.onnx_info import artifact_from_onnx, sidecar_report_path
    from retool.validators.structure import ort_load_check, structural_checks

    started = now_iso()
    tol, tol_data = _tolerance(model, tolerance)
    with staging_dir(out) as tmp:
        staged = tmp / out.name
        t0 = time.perf_counter()
        with console.step("exporting to ONNX"):
            try:
                result = model.export(staged, request.opset)
            except Exception as exc:  # exporters raise anything; the first line says what
                _raise_if_output_failed(exc, out)
                if isinstance(exc, RetoolError):
                    raise
                raise ConversionError(f"{request.source_label}: export to ONNX failed: {_first_line(exc)}"
                                      f"{_index_hint(exc, model.input_specs, request)}") from exc
        timings["export_s"] = time.perf_counter() - t0
        if not staged.exists():
            raise ConversionError(f"{request.source_label}: the exporter wrote no ONNX file")

        try:
            from retool.converter.slim import slim_node_metadata
            from retool.input_ranges import keep_given, rename_dims

            renamed = rename_dims(staged, model.input_specs)  # the user's axis names, not s27
            slim_node_metadata(staged)
            art = artifact_from_onnx(staged)
            art = dataclasses.replace(art, inputs=keep_given(art.inputs, model.input_specs))
        except UsageError as exc:  # our exporter wrote something unreadable: a conversion failure
            raise ConversionError(f"{request.source_label}: the exporter wrote an unreadable ONNX file ({exc})") from None
        digest = art.sha256
        src_digest = _source_digest(model, request)
        step = ProvenanceStep(
            "convert", result.tool, dict(model.versions),
            {"framework": request.framework, "source": request.source_label, "opset": art.opset,
             "inputs": [str(s) for s in model.input_specs], **dict(result.params)},
            src_digest, digest, started, None)
        # files the export wrote beside the model (an encoder-decoder's encoder and loop) travel with it
        companions = tuple(result.params.get("companion_files") or ())
        art = ModelArtifact(out, "onnx", art.inputs, art.outputs, art.opset, "fp32", None, digest, (step,),
                            art.extra_files + companions)

        identical = bool(result.params.get("identical_to_source"))
        ref = None
        if verify and not identical:
            t0 = time.perf_counter()
            with console.step("running the source model"):
                ref = model.reference(art, request, tol)
            timings["reference_s"] = time.perf_counter() - t0
        # Free the source before anything loads the ONNX copy: never two copies of the weights.
        model.close()
        checks: list[CheckResult] = structural_checks(staged)
        _raise_if_broken(checks, request)
        load_check, sess = ort_load_check(staged)
        checks.append(load_check)
        _raise_if_broken(checks, request)
        if verify and not identical:
            t0 = time.perf_counter()
            with console.step("verifying parity against the source framework"):
                checks += model.compare(sess, ref, art, request, tol)
            timings["verify_s"] = time.perf_counter() - t0
        else:
            why = "skipped (--no-verify)" if not verify else "skipped: the ONNX file is a byte copy of the source"
            checks.append(CheckResult("parity", True, message=why, severity="info"))
        del sess
        timings["total_s"] = sum(v for k, v in timings.items() if k != "total_s")
        final_step = ProvenanceStep(step.stage, step.tool, step.versions, step.params, step.input_sha256,
                                    step.output_sha256, step.started, round(timings["total_s"], 3))
        art = ModelArtifact(out, "onnx", art.inputs, art.outputs, art.opset, "fp32", None, digest,
                            (final_step,), art.extra_files)
        report = Report("convert", art, tuple(checks),
                        {"timings": {k: round(v, 4) for k, v in timings.items()},
                         "tolerance": tol.to_dict(), **tol_data, "exporter": result.tool,
                         "framework": request.framework, "verified": verify,
                         **{k: result.params[k] for k in REPORTED_PARAMS if k in result.params},
                         **dict(model.report_data),
                         "dynamic_dims": _dims_used(art.inputs, ref.feeds if ref is not None else []), "renamed_axes": renamed,
                         "hardware": _hardware()},
                        tuple(result.warnings))
        side = sidecar_report_path(out)
        if not report.passed:
            if write_report:
                atomic_write_text(side, report.to_json())
            raise ValidationFailed(
                f"{request.source_label}: parity check failed for "
                f"{', '.join(c.name for c in report.failed_checks)}; {out} was not written "
                f"(report: {side})", report=report)
        # the report first: a failed write (a full disk) then leaves no new model at -o
        if write_report:
            atomic_write_text(side, report.to_json())
        try:
            _move_companions(tmp, out, companions)
            move_onnx(staged, out)
        except BaseException:
            if write_report:
                side.unlink(missing_ok=True)
            raise
    return art, report


def _move_companions(tmp: Path, out: Path, names: Sequence[str]) -> None:
    """Move the files an export wrote beside the staged model next to ``out``, before the model itself."""
    from retool.fsutil import inside

    for name in names:
        src, dst = inside(tmp, name, allow_root=False), inside(out.parent, name, allow_root=False)
        if name.endswith(".onnx"):
            move_onnx(src, dst)
        else:
            os.replace(src, dst)


def _tolerance(model: SourceModel, tolerance) -> tuple:
    """(Tolerance, report data): the defaults for the source's own precision (int8 for a quantized source),
    with a mapping's entries (the CLI's --atol/--rtol/--min-cosine) on top; a Tolerance is used as given."""
    from retool.converter.source_precision import source_precision
    from retool.validators.parity import Tolerance, tolerance_for

    precision, why = source_precision(model)
    data = {"source_precision": precision}
    if isinstance(tolerance, Tolerance):
        return tolerance, {**data, "tolerance_from": "given"}
    given = dict(tolerance or {})  # None disables a limit
    bad = set(given) - {"atol", "rtol", "min_cosine", "min_top1"}
    if bad:
        raise UsageError(f"tolerance: unknown key(s) {', '.join(sorted(bad))}; use atol, rtol, min_cosine, min_top1")
    tol = dataclasses.replace(tolerance_for(precision), **given)
    data["tolerance_from"] = f"{precision} defaults" + (f" with {', '.join(sorted(given))} given" if given else "")
    if why:
        data["tolerance_reason"] = f"{why}: judged by the {precision} tolerances, as two {precision} kernels " \
                                   f"round differently"
    return tol, data


#: a write at the output failed for want of space or permission: the output is the problem, not the source
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _raise_if_output_failed(exc: BaseException, out: Path) -> None:
    """UsageError naming ``out`` when ``exc`` (or what it wraps) is a full or read-only file system."""
    seen, why = set(), None
    while exc is not None and id(exc) not in seen and why is None:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _OUTPUT_ERRNOS:
            why = exc.strerror
        elif isinstance(exc, ConversionError):  # converters that try several exporters keep only the text
            why = next((os.strerror(e) for e in _OUTPUT_ERRNOS if f"[Errno {e}] {os.strerror(e)}" in str(exc)), None)
        exc = exc.__cause__ or exc.__context__
    if why:
        raise UsageError(f"{out}: could not be written ({why}); free space or choose another -o; "
                         f"nothing was written there") from None


def _raise_if_broken(checks: list[CheckResult], request: ConvertRequest) -> None:
    broken = [c for c in checks if not c.passed]
    if broken:
        raise ConversionError(f"{request.source_label}: the exported ONNX is invalid "
                              f"({broken[0].name}: {broken[0].message})")


def _dims_used(specs, feeds_list) -> dict:
    from retool.input_ranges import dims_used

    return dims_used(specs, feeds_list)


def _hardware() -> dict:
    """The CPU the parity check ran on (retool.optimizers.hardware)."""
    from retool.optimizers.hardware import detect

    return detect().to_dict()
