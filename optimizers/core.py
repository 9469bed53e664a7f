"""``optimize``: one ONNX model in, one optimised artifact and its report out.

Everything is built in a staging folder beside the output; the model reaches
``output`` only once it loads in onnxruntime and meets the target's tolerance.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from retool import console
from retool.errors import OptimizationError, RetoolError, UsageError, ValidationFailed, first_line
from retool.types import CheckResult, ModelArtifact, ProvenanceStep, Report, now_iso

#: one-line error text; this module keeps its own length limit
_first_line = partial(first_line, limit=200)

#: Calibration samples the node ranking runs on (small: it exposes every tensor).
RANK_SAMPLES = 4


@dataclass
class Candidate:
    """One optimised model in the staging folder, with what was found about it."""

    target: str
    path: Path
    precision: str
    passed: bool
    checks: list
    tools: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)
    calibrated: bool = False
    calibration_samples: int = 0


class Context:
    """What every candidate of one ``optimize`` call shares: input, data, reference outputs, caches."""

    def __init__(self, art: ModelArtifact, workdir: Path, calib, method: str, tolerance, seed: int,
                 threads: int, budget: int):
        self.art, self.src, self.workdir = art, Path(art.path), workdir
        self.calib, self.method, self.tolerance, self.seed = calib, method, tolerance, seed
        self.threads, self.budget = threads, budget
        from retool.optimizers.graph import has_external_data

        self.external = has_external_data(self.src)
        self.output_names = [o.name for o in art.outputs]
        self.heldout = calib.heldout_samples()
        self.warnings: list[str] = list(calib.warnings)
        if not self.heldout:
            from retool.inputs import random_feeds
            from retool.optimizers.calibration import RANDOM_HELDOUT_SAMPLES, _batch

            self.heldout = [random_feeds(art.inputs, batch=_batch(art.inputs), seed=seed + 5000 + i)
                            for i in range(RANDOM_HELDOUT_SAMPLES)]
        with console.step(f"running the fp32 model on {len(self.heldout)} held-out samples"):
            try:
                self.reference = _run_all(self.src, self.heldout, threads)
            except RetoolError:
                raise
            except Exception as exc:
                raise UsageError(f"{self.src}: the input model does not run in onnxruntime ({_first_line(exc)}); "
                                 f"fix or re-export it first") from None
        self._pre: Path | None = None
        self._pre_warnings: list[str] = []
        self._caches: dict[tuple, tuple[Path, int]] = {}
        self._rank_feeds: list | None = None
        self._rank_ref: list | None = None

    def preprocessed(self) -> Path:
        if self._pre is None:
            from retool.optimizers.quantize import preprocess

            dst = self.workdir / "preprocessed.onnx"
            with console.step("quantization pre-process (shape inference, basic graph optimisation)"):
                self._pre_warnings = preprocess(self.src, dst, external=self.external)
            self._pre = dst
        return self._pre

    def calibration_cache(self, profile) -> tuple[Path, int]:
        """Ranges for ``profile``, computed once per (symmetry, op types, method) and reused."""
        from retool.optimizers.quantize import calibrate

        key = (profile.symmetric_activations, tuple(profile.op_types), self.method)
        if key not in self._caches:
            path = self.workdir / f"calibration-{len(self._caches)}.json"
            pre = self.preprocessed()
            with console.step(f"calibrating ({self.method}, {self.calib.source})"):
                n = calibrate(pre, self.calib.calibration_samples(), profile, self.method, path, self.workdir,
                              external=self.external)
            self._caches[key] = (path, n)
        return self._caches[key]

    def rank_feeds(self) -> list:
        if self._rank_feeds is None:
            feeds = []
            for s in self.calib.calibration_samples():
                feeds.append(s)
                if len(feeds) >= RANK_SAMPLES:
                    break
            self._rank_feeds = feeds or self.heldout[:RANK_SAMPLES]
        return self._rank_feeds

    def rank_reference(self) -> list[np.ndarray]:
        if self._rank_ref is None:
            self._rank_ref = _run_all(self.src, self.rank_feeds(), self.threads)
        return self._rank_ref

    def evaluate(self, path: Path, tol, level: str = "all") -> tuple[bool, list[CheckResult]]:
        """Parity of ``path`` against the fp32 reference on the held-out samples."""
        from retool.validators.parity import compare_outputs

        try:
            cand = _run_all(path, self.heldout, self.threads, level)
        except Exception as exc:
            return False, [CheckResult("onnxruntime.run", False, message=_first_line(exc))]
        checks = compare_outputs(self.output_names, self.reference, cand, tol, label="held-out")
        return all(c.passed for c in checks), checks


def _run_all(path, samples, threads, level: str = "all") -> list[np.ndarray]:
    """Outputs over all samples, concatenated along the batch axis."""
    from retool.runtime import make_session, run_session

    sess = make_session(path, threads=threads, level=level)
    outs: list[list[np.ndarray]] = []
    for feeds in samples:
        for i, o in enumerate(run_session(sess, feeds)):
            if len(outs) <= i:
                outs.append([])
            outs[i].append(np.asarray(o))
    return [np.concatenate(o, axis=0) if o[0].ndim else np.stack(o) for o in outs]


def build_candidate(profile, ctx: Context, tol) -> Candidate:
    """Build ``profile``'s model in the staging folder, with the accuracy-aware fallback for lossy targets."""
    from retool.optimizers import accuracy, quantize

    name = profile.name
    wd = ctx.workdir
    if profile.method == "graph":
        with console.step(f"{name}: graph optimisation (onnxsim/onnxoptimizer, onnxruntime {profile.graph_level})"):
            g = _graph(ctx, wd / f"{name}.onnx", profile)
        passed, checks = ctx.evaluate(g.path, tol)
        return Candidate(name, g.path, profile.precision, passed, checks, g.tools, g.versions, g.warnings)

    if profile.method == "weight_only":  # encoders and other non-decoder graphs: output parity
        from retool.optimizers import weight_only

        o = profile.extra_options
        out = wd / f"{name}.onnx"
        with console.step(f"{name}: weight-only int{o['bits']} (MatMulNBits, block {o['block_size']})"):
            weight_only.quantize(ctx.src, out, bits=int(o["bits"]), block_size=int(o["block_size"]),
                                 accuracy_level=o.get("accuracy_level"), symmetric=bool(o.get("symmetric", True)))
        passed, checks = ctx.evaluate(out, tol)
        return Candidate(name, out, profile.precision, passed, checks,
                         ["onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer"], quantize.versions())

    warnings: list[str] = []
    tools: list[str] = []
    versions: dict[str, str] = {}
    calibrated, n_calib = False, 0
    if profile.method == "fp16":
        from retool.optimizers import fp16

        with console.step(f"{name}: graph clean-up before fp16"):
            g = _graph(ctx, wd / f"{name}.base.onnx", profile)
        base, tools, versions, warnings = g.path, list(g.tools), dict(g.versions), list(g.warnings)
        tools.append("onnxconverter_common.float16(keep_io_types)")
        versions.update(fp16.versions())

        def build(exclude, i):
            out = wd / f"{name}.{i}.onnx"
            with _step(i, f"{name}: converting to fp16" + (f" ({len(exclude)} node(s) kept fp32)" if exclude else "")):
                warnings.extend(w for w in fp16.convert_fp16(base, out, exclude, external=ctx.external)
                                if w not in warnings)
            return out
        candidates = _float_nodes(base)
    else:
        base = ctx.preprocessed()
        warnings.extend(ctx._pre_warnings)
        tools.append("onnxruntime.quantization.quant_pre_process")
        versions.update(quantize.versions())
        if profile.method == "static":
            cache, n_calib = ctx.calibration_cache(profile)
            calibrated = True
            tools.append(f"onnxruntime.quantization.quantize_static({profile.quant_format}, {ctx.method})")

            def build(exclude, i):
                out = wd / f"{name}.{i}.onnx"
                with _step(i, f"{name}: quantizing" + (f" ({len(exclude)} node(s) kept float)" if exclude else "")):
                    quantize.quantize_static(base, out, profile, cache, ctx.method, exclude, external=ctx.external)
                return out
        else:
            tools.append("onnxruntime.quantization.quantize_dynamic")

            def build(exclude, i):
                out = wd / f"{name}.{i}.onnx"
                with _step(i, f"{name}: dynamic quantization" + (f" ({len(exclude)} node(s) kept float)" if exclude else "")):
                    quantize.quantize_dynamic(base, out, profile, exclude, external=ctx.external)
                return out
        candidates = quantize.quantizable_nodes(base, profile)

    def rank(path, excluded):
        try:
            return accuracy.rank_nodes(base, path, ctx.rank_feeds(), [c for c in candidates if c not in excluded],
                                       wd, touched_only=profile.method != "fp16")
        except RetoolError:
            raise
        except Exception as exc:  # the fallback is best effort; the parity gate still decides
            warnings.append(f"accuracy fallback could not rank nodes ({_first_line(exc)})")
            return []

    # ORT 1.32's CPU level-ALL transforms crash (SIGSEGV) on some partly-fp16 graphs; fp16 is
    # for GPUs, so CPU checks of fp16 models stop at EXTENDED and a subprocess tries ALL.
    level = "extended" if profile.method == "fp16" else "all"

    def impact(path):
        return accuracy.output_error(ctx.rank_reference(), _run_all(path, ctx.rank_feeds(), ctx.threads, level))

    res = accuracy.search(build, lambda p: ctx.evaluate(p, tol, level), rank, budget=ctx.budget,
                          label=f"{name}: ", impact=impact)
    if profile.method == "fp16":
        ok, msg = load_in_subprocess(res.path, "all")
        if not ok:
            warnings.append(f"onnxruntime CPU cannot load this fp16 model at graph level ALL ({msg}); "
                            f"on CPU use level EXTENDED (GPU providers are unaffected)")
    return Candidate(name, res.path, profile.precision, res.passed, res.checks, tools, versions, warnings,
                     res.excluded, res.attempts, calibrated, n_calib)


def load_in_subprocess(path, level: str = "all", timeout: float = 300) -> tuple[bool, str]:
    """Create an ORT CPU session in a child process, so a crash in ORT cannot take us down."""
    import subprocess
    import sys

    code = ("import sys; from retool.runtime import make_session; make_session(sys.argv[1], level=sys.argv[2])")
    try:
        r = subprocess.run([sys.executable, "-c", code, str(path), level], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timed out"
    if r.returncode == 0:
        return True, ""
    tail = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
    return False, tail[:200] if r.returncode > 0 else f"crashed with signal {-r.returncode}"


def _graph(ctx: Context, dst: Path, profile):
    from retool.optimizers import graph

    try:
        return graph.optimize_graph(ctx.src, dst, profile.graph_level, profile.simplify, check_feeds=ctx.heldout[0])
    except Exception as exc:
        raise OptimizationError(f"{ctx.src}: graph optimisation for {profile.name} failed "
                                f"({_first_line(exc)})") from exc


def _step(tag, msg):
    """Progress for real builds; the accuracy search's probe builds stay quiet."""
    import contextlib

    return contextlib.nullcontext() if isinstance(tag, str) else console.step(msg)


def _float_nodes(path) -> list[str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    skip = {"Shape", "Reshape", "Concat", "Gather", "Unsqueeze", "Squeeze", "Slice", "Cast", "Constant",
            "Identity", "Transpose", "Flatten"}
    return [n.name for n in m.graph.node if n.name and n.op_type not in skip]


def _resolve_tolerance(profile, tolerance):
    from retool.validators.parity import Tolerance

    if tolerance is None:
        return profile.tolerance
    if isinstance(tolerance, Tolerance):
        return tolerance
    if isinstance(tolerance, Mapping):
        bad = set(tolerance) - {"atol", "rtol", "min_cosine", "min_top1"}
        if bad:
            raise UsageError(f"tolerance: unknown key(s) {', '.join(sorted(bad))}; use atol, rtol, min_cosine, min_top1")
        return dataclasses.replace(profile.tolerance, **dict(tolerance))
    raise UsageError(f"tolerance: expected a Tolerance or a mapping, got {type(tolerance).__name__}")


def _load_input(model) -> ModelArtifact:
    from retool.onnx_info import artifact_from_onnx, load_onnx_header

    if isinstance(model, ModelArtifact):
        if model.format != "onnx":
            raise UsageError(f"{model.path}: optimize takes an ONNX model, this artifact is {model.format}; "
                             f"convert it first with 'retool convert'")
        path = model.path
    else:
        path = Path(model)
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; optimize takes an ONNX file (convert a saved model with 'retool convert')")
    header = load_onnx_header(path)
    if not header.ir_version or not header.graph.node:
        raise UsageError(f"{path}: not an ONNX model (no graph found); convert it first with 'retool convert'")
    return model if isinstance(model, ModelArtifact) else artifact_from_onnx(path)


def optimize(model, output, *, target: str, calibration=None, calibration_method: str = "minmax",
             tolerance=None, seed: int = 0, threads: int | None = None, measure: bool = True,
             accuracy_budget: int | None = None, preprocess: str | None = None) -> tuple[ModelArtifact, Report]:
    """Optimise ``model`` (path or ModelArtifact) for ``target`` and write it to ``output``.

    Raises UsageError (2) for bad input, OptimizationError (5) when a step fails,
    ValidationFailed (6) when the tolerance is still not met after the accuracy
    budget; then nothing is written at ``output`` (only the sidecar report).
    """
    from retool.fsutil import atomic_write_text, check_output_path, sha256_file
    from retool.onnx_info import sidecar_report_path
    from retool.optimizers import accuracy, latency
    from retool.optimizers.calibration import open_calibration
    from retool.optimizers.quantize import METHODS
    from retool.optimizers.targets import get_target

    started, t_start = now_iso(), time.perf_counter()
    profile = get_target(target)
    if calibration_method not in METHODS:
        raise UsageError(f"--calibration-method {calibration_method!r}: use one of {', '.join(METHODS)}")
    art = _load_input(model)
    out = check_output_path(output)
    if out.resolve() == Path(art.path).resolve():
        raise UsageError(f"{out}: output is the input model; choose another -o")
    tol = _resolve_tolerance(profile, tolerance)
    threads = threads or latency.default_threads()
    budget = accuracy.DEFAULT_BUDGET if accuracy_budget is None else int(accuracy_budget)
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
    calib = open_calibration(calibration, art.inputs, seed=seed, preprocess=preprocess)
    needs_calibration = profile.method == "static" or (profile.method == "auto" and any(
        get_target(c).method == "static" for c in profile.candidates))
    if calib.random and needs_calibration:
        console.warn(calib.warnings[0])

    with staging_dir_for(out) as wd:
        ctx = Context(art, wd, calib, calibration_method, tol, seed, threads, budget)
        ctx.user_tolerance = tolerance
        if profile.method == "auto":
            from retool.optimizers.auto import choose

            cand, auto_data = choose(profile, ctx)
        else:
            cand, auto_data = build_candidate(profile, ctx, tol), None
            _check_loads(cand)

        lat = None
        if auto_data is not None and auto_data.get("latency") and cand.target in auto_data["latency"]["variants"]:
            lat = _ratio(auto_data["latency"], cand.target)  # measured with the other candidates already
        elif measure and cand.passed:
            try:
                with console.step(f"measuring latency (batch 1, {threads} threads, interleaved with fp32)"):
                    lat = _latency(art.path, cand.path, ctx.heldout[0], threads)
            except Exception as exc:  # a measurement problem must not discard a good model
                cand.warnings.append(f"latency not measured ({_first_line(exc)})")

        staged = wd / out.name
        finalize(cand.path, staged)
        digest = sha256_file(staged)
        extra = _external_names(staged)
        report, new_art = _report(art, profile, cand, ctx, tol, lat, auto_data, staged, out, digest, extra,
                                  started, time.perf_counter() - t_start, calibration_method, seed, needs_calibration)
        side = sidecar_report_path(out)
        if not cand.passed:
            atomic_write_text(side, report.to_json())
            failed = [c for c in report.failed_checks]
            raise ValidationFailed(
                f"{art.path}: {profile.name} result misses its tolerance ({_why(failed)}) after keeping "
                f"{len(cand.excluded)} node(s) in float; {out} was not written (report: {side}); "
                f"relax --tolerance{', give representative --calibration data' if cand.calibrated else ''} "
                f"or choose another --target", report=report)
        from retool.fsutil import move_onnx

        move_onnx(staged, out)
    atomic_write_text(sidecar_report_path(out), report.to_json())
    return new_art, report


def staging_dir_for(out: Path):
    from retool.fsutil import staging_dir

    return staging_dir(out)


def _check_loads_path(path, target: str) -> None:
    _check_loads(Candidate(target, Path(path), "", True, []))


def _check_loads(cand: Candidate) -> None:
    from retool.runtime import make_session

    try:
        make_session(cand.path, level="extended" if cand.precision == "fp16" else "all")
    except Exception as exc:
        raise OptimizationError(f"{cand.path.name}: the {cand.target} model does not load in onnxruntime "
                                f"({_first_line(exc)})") from exc


def _latency(fp32_path, cand_path, feeds, threads) -> dict:
    from retool.optimizers import latency

    return _ratio(latency.measure({"fp32": fp32_path, "candidate": cand_path}, feeds, threads=threads), "candidate")


def _ratio(m: dict, label: str) -> dict:
    f, c = m["variants"]["fp32"]["p50_ms"], m["variants"][label]["p50_ms"]
    return {"threads": m["threads"], "batch": 1, "fp32_p50_ms": f, "candidate_p50_ms": c,
            "ratio": round(c / f, 4) if f else None, "rounds": m["rounds"], "spinning": False,
            "variants": m["variants"]}


def finalize(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst``; external data is rewritten to ``<dst name>.data`` beside it."""
    import onnx

    from retool.fsutil import external_data_files

    if external_data_files(src):
        m = onnx.load(str(src))  # one copy, needed to rewrite the data file name
        onnx.save(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=dst.name + ".data", size_threshold=1024)
    else:
        os.replace(src, dst)


def _external_names(path) -> tuple[str, ...]:
    from retool.fsutil import external_data_files

    return external_data_files(path)


def _why(failed: Sequence[CheckResult]) -> str:
    return "; ".join(f"{c.name}: {c.message}" for c in failed[:2]) or "parity"


def _report(art, profile, cand: Candidate, ctx: Context, tol, lat, auto_data, staged, out, digest, extra,
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
    calib["used"] = cand.calibrated
    parity = {c.name: {k: (c.details or {}).get(k) for k in ("cosine", "top1", "max_abs", "mean_abs", "max_rel")}
              for c in cand.checks}
    parity["samples"] = len(ctx.heldout)
    parity["heldout_source"] = "random" if ctx.calib.random or not ctx.calib.heldout_items else ctx.calib.source
    size_in = file_size(art.path, art.extra_files)
    size_out = file_size(staged, extra)
    data = {
        "target": profile.name,
        "chosen_target": cand.target,
        "profile": profile.to_dict(),
        "size_mb": round(size_out / 1e6, 4),
        "size_mb_input": round(size_in / 1e6, 4),
        "size_ratio": round(size_out / size_in, 4) if size_in else None,
        "latency": lat,
        "parity": parity,
        "tolerance": tol.to_dict(),
        "calibration": calib,
        "excluded_nodes": list(cand.excluded),
        "excluded_layers": [{"node": n, "source_layer": layers.get(n, n)} for n in cand.excluded],
        "accuracy_search": cand.attempts,
        "node_types": dict(sorted(op_counts.items())),
        "tools": cand.tools,
        "evaluated_on": "CPUExecutionProvider",
    }
    if profile.provider != "CPUExecutionProvider":
        data["note"] = (f"parity was checked with CPUExecutionProvider; the target runs on {profile.provider}")
    if auto_data is not None:
        data["auto"] = auto_data
    warnings = list(dict.fromkeys(([ctx.calib.warnings[0]] if ctx.calib.random and needs_calibration else [])
                                  + [w for w in ctx.warnings if not ctx.calib.random] + list(cand.warnings)))
    checks = [CheckResult("onnxruntime.load", True)] + list(cand.checks)
    if lat:
        checks.append(CheckResult("latency.ratio", True, lat["ratio"], None,
                                  f"candidate p50 {lat['candidate_p50_ms']:.3f} ms vs fp32 {lat['fp32_p50_ms']:.3f} ms "
                                  f"(batch 1, {lat['threads']} threads)", {}, "info"))
    step = ProvenanceStep(
        "optimize", f"retool.optimizers:{cand.target}", {**cand.versions},
        {"target": profile.name, "chosen_target": cand.target, "calibration_digest": calib["digest"] if cand.calibrated else None,
         "calibration_method": method if cand.calibrated else None, "calibration_random": ctx.calib.random if cand.calibrated else None,
         "tolerance": tol.to_dict(), "seed": seed, "excluded_nodes": list(cand.excluded), "tools": cand.tools},
        art.sha256, digest, started, round(seconds, 3))
    new_art = art.derive(out, step, precision=cand.precision if cand.precision != "auto" else "fp32",
                         target=cand.target, sha256=digest, extra_files=tuple(extra))
    return Report("optimize", new_art, tuple(checks), data, tuple(warnings)), new_art
