"""``validate``: is this ONNX model ready for production? Parity, latency, placement, gates.

Returns a Report whose ``data`` layout is documented in docs/report-schema.md
and checked by retool/schemas/report.schema.json. A failed gate is a
``report.passed == False``; only bad input raises (UsageError ...).
"""
from __future__ import annotations

import platform
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from retool import console
from retool.errors import RetoolError, UsageError, first_line
from retool.types import CheckResult, ProvenanceStep, Report, TensorSpec, now_iso
from retool.validators.gates import Gates, gate_checks, load_gates
from retool.validators.tables import (GATE_HEADERS, SUMMARY_HEADERS, gate_rows, summary_rows,  # noqa: F401
                                      summary_text)

#: one-line error text; this module keeps its own length limit
_first_line = partial(first_line, limit=300)

#: When the batch axis is dynamic and only batch 1 is asked for, parity also runs here:
#: a model right at batch 1 and wrong above must not reach Triton dynamic batching.
EXTRA_PARITY_BATCH = 4
#: Rows of a batch re-run alone to check that rows do not leak into each other.
CONSISTENCY_ROWS = (0, -1)


def validate(candidate, reference=None, *, batch_sizes: Sequence[int] = (1,), latency: bool = False,
             threads: int | None = None, gates: "Gates | Mapping | str | Path | None" = None,
             report_dir=None, framework: str = "auto", inputs: Sequence[TensorSpec | str] = (),
             example_inputs: "Mapping[str, np.ndarray] | str | Path | None" = None,
             trust_remote_code: bool = False, seed: int = 0, runs: int | None = None,
             time_budget_s: float | None = None, weights=None, options: Mapping[str, Any] | None = None,
             providers: Sequence[str] | None = None) -> Report:
    """Validate the ONNX model ``candidate`` (against ``reference`` when given).

    ``reference`` is another ONNX file or a source model in any form ``convert``
    accepts (``framework``/``inputs``/``weights``/``options``/``trust_remote_code``
    are used to load it). Latency is measured when ``latency`` is true, a gate
    needs it, or the candidate is quantized and has a reference (the default
    not-slower gate, validators/speed_gate.py). Writes report.json/.md/.html into ``report_dir`` when given.
    """
    from retool.inputs import load_npz, parse_specs
    from retool.onnx_info import artifact_from_onnx
    from retool.validators import latency as lat
    from retool.validators.parity import tolerance_for

    from retool import machine

    t_start = time.perf_counter()
    started = now_iso()
    m_since = machine.now()
    cand_path = Path(candidate)
    if not cand_path.is_file():
        raise UsageError(f"{cand_path}: candidate model not found; give the ONNX file to validate")
    art = artifact_from_onnx(cand_path)
    gates = load_gates(gates)
    batch_sizes, note = _check_batch_sizes(batch_sizes, art.inputs, cand_path)
    threads = int(threads) if threads else lat.default_threads()
    if threads < 1:
        raise UsageError(f"--threads {threads}: must be at least 1")
    plan = lat.Plan.make(runs, time_budget_s)
    from retool.validators.speed_gate import applies as speed_gate_applies

    # a quantized candidate with a reference is timed by default: its not-slower gate needs it
    measure = bool(latency or gates.needs_latency or (reference is not None and speed_gate_applies(gates, art.precision)))
    if gates.min_speedup is not None and reference is None:
        raise UsageError(f"{cand_path}: a minimum speedup needs a reference to compare with; give --reference")
    if report_dir is not None:
        _check_report_dir(report_dir)
    _check_providers(providers)

    given = parse_specs(inputs)
    specs = _merge_specs(art.inputs, given)
    examples = load_npz(example_inputs) if isinstance(example_inputs, (str, Path)) else example_inputs
    if examples is not None:
        missing = [s.name for s in specs if s.name not in examples]
        if missing:
            raise UsageError(f"{example_inputs if isinstance(example_inputs, (str, Path)) else 'example_inputs'}: "
                             f"no array for input(s) {missing}; the candidate's inputs are {[s.name for s in specs]}")
    dynamic = bool(specs) and all(s.has_dynamic_batch for s in specs if s.shape)
    parity_batches = list(batch_sizes)
    if dynamic and max(parity_batches) == 1:
        parity_batches.append(EXTRA_PARITY_BATCH)
    out_names = [o.name for o in art.outputs]
    warnings: list[str] = [note] if note else []
    checks: list[CheckResult] = []
    data: dict[str, Any] = {
        "candidate": {"path": str(cand_path), "sha256": art.sha256, "precision": art.precision, "opset": art.opset,
                      "inputs": [s.to_dict() for s in specs], "outputs": [o.to_dict() for o in art.outputs]},
        "reference": None, "size_mb": None, "size_bytes": None, "threads": threads,
        "batch_sizes": list(batch_sizes), "parity_batch_sizes": parity_batches, "seed": seed,
        "parity": {}, "batch_consistency": {}, "tolerances": {},
        "latency": {"measured": measure, "plan": plan.to_dict() if measure else None,
                    "candidate": {}, "reference": {}, "speedup": {}, "speedup_stats": {}},
        "providers": None, "gates": [], "gate_config": gates.to_dict(), "environment": _environment(),
        "_machine_since": m_since,
    }
    from retool.fsutil import file_size

    size_bytes = file_size(cand_path, art.extra_files)
    data["size_bytes"] = size_bytes
    data["size_mb"] = round(size_bytes / 1e6, 6)

    from retool.runtime import make_session

    try:
        sess = make_session(cand_path, threads=threads, providers=providers)
    except Exception as exc:
        checks.append(CheckResult("onnxruntime.load", False, message=_first_line(exc)))
        return _finish(art, checks, data, warnings, gates, report_dir, started, t_start, size_bytes)
    checks.append(CheckResult("onnxruntime.load", True, severity="info"))

    from retool.validators.generation import is_decoder_graph

    if is_decoder_graph([s.name for s in specs]):
        from retool.validators.decoder_check import check_decoder

        with console.step("generation parity (greedy decoding with the cache) against the reference"):
            checks += check_decoder(cand_path, sess, reference, gates, data, warnings, measure, threads, plan, seed)
        del sess
        checks += gate_checks(gates, size_mb=data["size_mb"], latency=data["latency"])
        return _finish(art, checks, data, warnings, gates, report_dir, started, t_start, size_bytes)

    ref = None
    if reference is not None:
        from retool.validators.reference import open_reference

        with console.step(f"loading reference {reference}"):
            ref = open_reference(reference, candidate_inputs=specs, candidate_outputs=out_names, threads=threads,
                                 framework=framework, inputs=given, example_inputs=examples,
                                 trust_remote_code=trust_remote_code, weights=weights, options=options,
                                 seed=seed, providers=providers)
        data["reference"] = ref.describe()
        warnings += [n for n in ref.notes if "could not" in n or "not pinned" in n]
        src_ranges = ref.input_ranges()
        if src_ranges:  # the source's own sizes (an HF config) over what the graph shows or hides
            from retool.input_ranges import prefer

            specs = prefer(specs, src_ranges, given)
            data["candidate"]["inputs"] = [s.to_dict() for s in specs]
    else:
        checks.append(CheckResult("parity", True, message="no reference given: parity not checked", severity="info"))
    try:
        base_tol = tolerance_for(art.precision)
        tols = {n: gates.tolerance(n, base_tol) for n in out_names}
        data["tolerances"] = {n: t.to_dict() for n, t in tols.items()}
        feeds_by_batch: dict[int, dict] = {}
        with console.step(f"checking parity at batch sizes {','.join(map(str, parity_batches))}"):
            for b in parity_batches:
                feeds = _feeds(specs, examples, b, seed, dynamic)
                ok = _parity_at(b, feeds, sess, ref, out_names, tols, checks, data, dynamic,
                                specs if examples is None else ())
                if ok:
                    feeds_by_batch[b] = feeds
        if measure:
            for b in batch_sizes:
                if b not in feeds_by_batch:
                    continue
                with console.step(f"timing batch {b} ({threads} threads)"):
                    _latency_at(b, feeds_by_batch[b], sess, ref, plan, data, gates,
                                not_slower=ref is not None and speed_gate_applies(gates, art.precision))
        from retool.input_ranges import dims_used

        data["dynamic_dims"] = dims_used(specs, list(feeds_by_batch.values()))
        placement_feeds = next(iter(feeds_by_batch.values()), None)
        if placement_feeds is not None:
            try:
                from retool.validators.providers import node_placement

                data["providers"] = node_placement(cand_path, placement_feeds, threads, providers)
                missing = [p for p in (providers or ()) if p not in data["providers"]["session"]]
                if missing:
                    warnings.append(f"execution provider(s) {missing} not available in this onnxruntime "
                                    f"(available: {data['providers']['available']}); ran on "
                                    f"{data['providers']['session']}")
            except Exception as exc:  # profiling is a report detail; never fail validation on it
                warnings.append(f"node placement unavailable: {_first_line(exc)}")
        if ref is not None and ref.size_bytes:
            data["reference"]["size_mb"] = round(ref.size_bytes / 1e6, 6)
    finally:
        if ref is not None:
            ref.close()
        del sess
    _mark_measured_on(data, art.target)
    checks += gate_checks(gates, size_mb=data["size_mb"], latency=data["latency"])
    from retool.validators.speed_gate import gate_note, not_slower_checks

    checks += not_slower_checks(gates, art.precision, data["latency"])
    note = gate_note(gates, art.precision, data["latency"]) if (measure or reference is not None) else None
    if note:
        warnings.append(note)
    data["checked"] = _what_was_checked(reference, measure, data)
    return _finish(art, checks, data, warnings, gates, report_dir, started, t_start, size_bytes)


def _finish(art, checks, data, warnings, gates, report_dir, started, t_start, size_bytes) -> Report:
    from retool import machine

    data["machine"] = machine.during(data.pop("_machine_since", None))
    if data["latency"].get("measured") and data["machine"]["busy"]:
        warnings.append(machine.describe(data["machine"]))
    data["gates"] = [{"name": c.name, "value": c.value, "threshold": c.threshold, "passed": bool(c.passed),
                      "message": c.message, **({"decision": c.details["decision"]} if "decision" in (c.details or {})
                                               else {})} for c in checks if c.severity == "gate"]
    seconds = round(time.perf_counter() - t_start, 3)
    data["timings"] = {"total_s": seconds}
    step = ProvenanceStep("validate", "retool.validate", _versions(),
                          {"reference": (data.get("reference") or {}).get("label"), "threads": data["threads"],
                           "batch_sizes": data["batch_sizes"], "gates": gates.to_dict()},
                          art.sha256, art.sha256, started, seconds)
    report = Report("validate", art.derive(art.path, step), tuple(checks), data, tuple(warnings))
    if report_dir is not None:
        write_reports(report, report_dir)
    return report


def _parity_at(b, feeds, sess, ref, out_names, tols, checks, data, dynamic, random_specs=()) -> bool:
    """Parity (vs the reference) and row consistency at batch ``b``; False if the candidate failed to run."""
    from retool.input_ranges import index_hint
    from retool.validators.parity import compare_output, output_stats

    try:
        cand = sess.run(None, feeds)
    except Exception as exc:
        checks.append(CheckResult(f"run@batch{b}", False, None, None,
                                  f"onnxruntime failed at batch {b}: {_first_line(exc)}"
                                  f"{index_hint(str(exc), random_specs)}"))
        return False
    if ref is not None:
        try:
            expected = ref.run(feeds)
        except RetoolError:
            raise
        except Exception as exc:
            hint = index_hint(f"{type(exc).__name__}: {exc}", random_specs)
            raise UsageError(f"{ref.label}: the reference failed at batch {b} ({_first_line(exc)})"
                             + (hint if hint else "; choose --batch-sizes the reference supports")) from None
        if len(expected) != len(cand):
            checks.append(CheckResult(f"parity:outputs@batch{b}", False, len(cand), len(expected),
                                      f"candidate has {len(cand)} outputs, reference has {len(expected)}"))
        else:
            for name, r, c in zip(out_names, expected, cand):
                chk = compare_output(name, r, c, tols[name], f"batch{b}")
                checks.append(chk)
                entry = dict(chk.details)
                if np.shape(r) == np.shape(c) and "cosine" not in entry:
                    entry.update(output_stats(r, c))  # integer outputs: full stats for the report too
                entry.update({"passed": bool(chk.passed), "batch": b, "output": name, "message": chk.message})
                data["parity"][f"{name}@batch{b}"] = entry
    if dynamic and b > 1:
        _consistency_at(b, feeds, cand, sess, out_names, tols, checks, data)
    return True


def _consistency_at(b, feeds, cand, sess, out_names, tols, checks, data) -> None:
    """A row run alone must give what it gave inside the batch (Triton concatenates requests)."""
    from retool.validators.parity import compare_output

    rows = sorted({r % b for r in CONSISTENCY_ROWS})
    alone = [sess.run(None, {k: v[r:r + 1] for k, v in feeds.items()}) for r in rows]
    for i, name in enumerate(out_names):
        if np.ndim(cand[i]) == 0 or np.shape(cand[i])[0] != b:
            continue  # not batched along axis 0
        ref = np.concatenate([a[i] for a in alone], axis=0)
        got = np.concatenate([cand[i][r:r + 1] for r in rows], axis=0)
        chk = compare_output(name, ref, got, tols[name], f"batch{b}")
        chk = CheckResult(f"batch-consistency:{name}@batch{b}", chk.passed, chk.value, chk.threshold,
                          (f"rows {rows} differ when run alone vs inside batch {b}: " + chk.message) if not chk.passed else "",
                          chk.details)
        checks.append(chk)
        data["batch_consistency"][f"{name}@batch{b}"] = {
            "passed": bool(chk.passed), "rows": rows, "max_abs": chk.details.get("max_abs"),
            "cosine": chk.details.get("cosine"), "message": chk.message}


def _latency_at(b, feeds, sess, ref, plan, data, gates=None, not_slower=False) -> None:
    from retool.validators import latency as lat

    variants = {"candidate": (lambda s=sess, f=feeds: s.run(None, f))}
    if ref is not None:
        variants["reference"] = ref.runner(feeds)
    samples, cpu = lat.measure_interleaved(variants, plan, cpu_times=True)
    if gates is not None:  # undecided latency gates get more rounds (validators/decide_gates.py)
        from retool.validators import decide_gates as dg

        # at 1 thread ORT runs on this thread: its CPU time is the load-robust figure (not for a source
        # framework reference, which may hand work to threads of its own)
        robust = data["threads"] == 1 and (ref is None or ref.kind == "onnx")
        ds, extra = dg.measure_until_decided(b, samples, variants, gates, not_slower, dg.budget_s(gates, plan),
                                             cpu=cpu, use_cpu=robust)
        if ds:
            data["latency"].setdefault("decisions", {})[str(b)] = {n: d.to_dict() for n, d in ds.items()}
            data["latency"].setdefault("extra_timing_s", {})[str(b)] = extra
    for name, s in samples.items():
        data["latency"][name][str(b)] = lat.summarize(s, b, cpu_ms=cpu.get(name))
    if ref is not None:
        entry = lat.paired_speedup(samples["reference"], samples["candidate"])
        data["latency"]["speedup"][str(b)] = entry["speedup"]
        data["latency"]["speedup_stats"][str(b)] = entry


def _check_providers(providers) -> None:
    """A provider this onnxruntime lacks is a usage error: a silent CPU fallback would time the wrong thing."""
    if not providers:
        return
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise UsageError(f"--provider {','.join(missing)}: not available in this onnxruntime (available: "
                         f"{', '.join(available)}); install the onnxruntime build for that hardware, or leave "
                         f"out --provider to validate on CPU")


def _mark_measured_on(data, target) -> None:
    """Say where latency was measured, and whether that is the target's hardware."""
    from retool.validators.speed_gate import measured_off_target

    latd = data["latency"]
    if not latd.get("candidate"):
        return
    session = (data.get("providers") or {}).get("session") or ["CPUExecutionProvider"]
    latd["measured_on"] = session[0]
    off = measured_off_target(target, session)
    if off:
        latd["off_target"] = off


def _what_was_checked(reference, measured, data) -> dict:
    """One honest list of what this validation did and did not check."""
    did = ["the model loads in onnxruntime", "it runs at batch " + ",".join(map(str, data["parity_batch_sizes"]))]
    if data["batch_consistency"]:
        did.append("rows of a batch do not affect each other")
    not_done = []
    if reference is None:
        not_done.append("parity against a reference (give --reference: the fp32 ONNX or the source model)")
        if measured:
            not_done.append("speed-up (needs a reference)")
    else:
        did.append("parity against the reference")
    if measured:
        did.append("latency")
    else:
        not_done.append("latency (give --latency)")
    return {"checked": did, "not_checked": not_done}


def _feeds(specs, examples, b, seed, dynamic) -> dict[str, np.ndarray]:
    from retool.inputs import random_feeds, resize_batch

    if examples is not None:
        return {k: np.asarray(v) for k, v in (resize_batch(examples, b) if dynamic else examples).items()}
    return random_feeds(specs, batch=b, seed=seed)


def _merge_specs(declared, given) -> tuple[TensorSpec, ...]:
    if not given:
        return tuple(declared)
    by_name = {s.name: s for s in given}
    unknown = sorted(set(by_name) - {s.name for s in declared})
    if unknown:
        raise UsageError(f"--input {unknown}: the candidate has no such input; its inputs are "
                         f"{[str(s) for s in declared]}")
    return tuple(by_name.get(s.name, s) for s in declared)


def _check_batch_sizes(batch_sizes, specs, path) -> tuple[list[int], str]:
    try:
        sizes = sorted({int(b) for b in batch_sizes})
    except (TypeError, ValueError):
        raise UsageError(f"--batch-sizes {batch_sizes!r}: expected positive integers such as 1,8,32") from None
    if not sizes or sizes[0] < 1:
        raise UsageError(f"--batch-sizes {batch_sizes!r}: expected positive integers such as 1,8,32")
    static = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
    if static:
        fixed = next(iter(static))
        if sizes == [1] and fixed != 1:  # the default: use the only batch size the model accepts
            return [fixed], f"the model's batch axis is fixed at {fixed}; validated at batch {fixed}"
        if sizes != [fixed]:
            raise UsageError(f"{path}: the model's batch axis is fixed at {fixed}, so --batch-sizes "
                             f"{','.join(map(str, sizes))} cannot run; use --batch-sizes {fixed} or export "
                             f"with a dynamic batch axis")
    return sizes, ""


def _check_report_dir(d) -> None:
    p = Path(d)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{p}: --report-dir is a file; give a folder")
    parent = p if p.exists() else p.parent
    while not parent.exists():
        parent = parent.parent
    import os

    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{p}: --report-dir is not writable; choose another folder")


def write_reports(report: Report, directory) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``directory``; returns {"json"|"md"|"html": path}."""
    from retool.fsutil import atomic_write_text
    from retool.validators.report_html import render_html
    from retool.validators.report_md import render_markdown

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"json": d / "report.json", "md": d / "report.md", "html": d / "report.html"}
    # render all three before writing any: a renderer that fails leaves the old set whole
    texts = {"json": report.to_json() + "\n", "md": render_markdown(report), "html": render_html(report)}
    for kind, text in texts.items():
        atomic_write_text(paths[kind], text)
    return paths


def report_schema() -> dict:
    """The JSON schema of report.json (retool/schemas/report.schema.json)."""
    import json
    from importlib.resources import files

    return json.loads(files("retool").joinpath("schemas/report.schema.json").read_text())


def _versions() -> dict[str, str]:
    from retool.deps import version_of

    return {k: version_of(k) or "" for k in ("onnxruntime", "onnx", "numpy")}


def _environment() -> dict:
    import os

    from retool.validators.latency import default_threads

    from retool.optimizers.hardware import detect

    return {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "cpus_usable": default_threads(), "versions": _versions(),
            "hardware": detect().to_dict()}
