"""One optimisation candidate: what every candidate of an ``optimize`` call shares (``Context``: input,
calibration data, held-out reference outputs, caches) and how one target's model is built and checked
against its tolerance (``build_candidate``), in the staging folder ``optimize`` gives it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Mapping

import numpy as np

from retool import console
from retool.errors import OptimizationError, RetoolError, UsageError, first_line
from retool.optimizers.artifact import float_nodes, load_in_subprocess
from retool.types import CheckResult, ModelArtifact

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
    #: calibration method as used (minmax | entropy | percentile); None when nothing was calibrated
    method: str | None = None
    #: the profile as built (adapted to the CPU it is tuned for), and why it was adapted
    profile: object = None
    notes: list[str] = field(default_factory=list)
    #: more report data (the transformer path's variants)
    extra: dict = field(default_factory=dict)


class Context:
    """What every candidate of one ``optimize`` call shares: input, data, reference outputs, caches."""

    def __init__(self, art: ModelArtifact, workdir: Path, calib, method: str, tolerance, seed: int,
                 threads: int, budget: int):
        self.art, self.src, self.workdir = art, Path(art.path), workdir
        self.calib, self.method, self.tolerance, self.seed = calib, method, tolerance, seed
        self.threads, self.budget = threads, budget
        from retool.optimizers import hardware
        from retool.optimizers.graph import has_external_data

        self.here = hardware.detect()
        self.cpu = self.here  # the CPU the profiles are tuned for (optimize's tune_for)

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
        self.percentile: float | None = None
        self.goal = None  # optimizers.goal.AccuracyGoal
        self.measure = True
        self._encoder = False

    @property
    def encoder(self):
        """The transformer encoder this model is (optimizers.transformer.Encoder), or None."""
        if self._encoder is False:
            from retool.optimizers.transformer import detect_encoder

            self._encoder = None if self.external else detect_encoder(self.src)
        return self._encoder

    @property
    def fp32_tolerance(self):
        from retool.validators.parity import DEFAULT_TOLERANCES

        return DEFAULT_TOLERANCES["fp32"]

    def preprocessed(self) -> Path:
        if self._pre is None:
            from retool.optimizers.quantize import preprocess

            dst = self.workdir / "preprocessed.onnx"
            with console.step("quantization pre-process (shape inference, basic graph optimisation)"):
                self._pre_warnings = preprocess(self.src, dst, external=self.external)
            self._pre = dst
        return self._pre

    def calibration_cache(self, profile, method: str) -> tuple[Path, int]:
        """Ranges for ``profile``, computed once per (symmetry, op types, method) and reused."""
        from retool.optimizers.quantize import calibrate, method_label

        key = (profile.symmetric_activations, tuple(profile.op_types), method, self.percentile)
        if key not in self._caches:
            path = self.workdir / f"calibration-{len(self._caches)}.json"
            pre = self.preprocessed()
            with console.step(f"calibrating ({method_label(method, self.percentile)}, {self.calib.source})"):
                n = calibrate(pre, self.calib.calibration_samples(), profile, method, path, self.workdir,
                              external=self.external, percentile=self.percentile)
            self._caches[key] = (path, n)
            self._check_sample_count(n)
        return self._caches[key]

    def _check_sample_count(self, used: int) -> None:
        from retool.optimizers.calibration import short_count_warning

        w = short_count_warning(self.calib, used)
        if w and w not in self.warnings:
            console.warn(w)
            self.warnings.append(w)

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


def build_candidate(profile, ctx: Context, tol, method: str | None = None, base: Path | None = None,
                    tag: str | None = None, budget: int | None = None) -> Candidate:
    """Build ``profile``'s model in the staging folder, with the accuracy-aware fallback for lossy targets.

    ``method``: the calibration method of a static target (default: the one optimize was given).
    A dynamic target on a recognised encoder goes through the transformer path (fused and
    unfused bases, optimizers.transformer); ``base``/``tag`` are that path's calls back here.
    ``budget``: the accuracy search's retries (default the context's)."""
    from retool.optimizers import accuracy, hardware, quantize

    if profile.method == "dynamic" and tag is None and ctx.encoder is not None:
        from retool.optimizers.transformer import build_dynamic

        return build_dynamic(profile, ctx, tol, build_candidate)

    profile, notes = hardware.adapt(profile, ctx.cpu)
    method = method or ctx.method or "minmax"
    label = quantize.method_label(method, ctx.percentile)
    name = profile.name if method == (ctx.method or "minmax") else f"{profile.name}-{method}"
    name += f"-{tag}" if tag else ""
    wd = ctx.workdir
    if profile.method == "graph":
        with console.step(f"{name}: graph optimisation (onnxsim/onnxoptimizer, onnxruntime {profile.graph_level})"):
            g = _graph(ctx, wd / f"{name}.onnx", profile)
        passed, checks = ctx.evaluate(g.path, tol)
        return Candidate(name, g.path, profile.precision, passed, checks, g.tools, g.versions, g.warnings,
                         profile=profile, notes=notes)

    if profile.method == "weight_only":  # encoders and other non-decoder graphs: output parity
        from retool.optimizers import weight_only

        o = profile.extra_options
        out = wd / f"{name}.onnx"
        with console.step(f"{name}: weight-only int{o['bits']} (MatMulNBits, block {o['block_size']})"):
            algo = str(o.get("algorithm", "rtn"))  # gptq calibrates on the calibration data
            weight_only.quantize(ctx.src, out, bits=int(o["bits"]), block_size=int(o["block_size"]),
                                 accuracy_level=o.get("accuracy_level"), symmetric=bool(o.get("symmetric", True)),
                                 algorithm=algo, calibration=list(ctx.calib.calibration_samples())
                                 if algo == "gptq" else None)
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
        candidates = float_nodes(base)
    else:
        base = base or ctx.preprocessed()
        warnings.extend(ctx._pre_warnings)
        tools.append("onnxruntime.quantization.quant_pre_process")
        versions.update(quantize.versions())
        if profile.method == "static":
            cache, n_calib = ctx.calibration_cache(profile, method)
            calibrated = True
            tools.append(f"onnxruntime.quantization.quantize_static({profile.quant_format}, {label})")

            def build(exclude, i):
                out = wd / f"{name}.{i}.onnx"
                with _step(i, f"{name}: quantizing" + (f" ({len(exclude)} node(s) kept float)" if exclude else "")):
                    quantize.quantize_static(base, out, profile, cache, method, exclude, external=ctx.external)
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

    if profile.reduce_range and hardware.reduce_range_is_guidance(profile, ctx.cpu):
        # ORT's guidance (7-bit weights without VNNI) trades saturation for precision; which one
        # costs more depends on the model, so the ways out are built and the smallest output error wins.
        err, variants = {}, quantize.saturation_variants(profile, base)
        for key, prof in variants.items():
            profile = prof
            p = build([], f"sat-{len(err)}")
            err[key] = impact(p)
            accuracy._remove_onnx(p)
        keep = min(err, key=err.get)
        profile = variants[keep]
        notes.append("measured on calibration samples (u8s8 saturates without VNNI): output error "
                     + ", ".join(f"{err[k]:.4g} with {k}" for k in err)
                     + f"; kept {keep}: reduce_range={'on' if profile.reduce_range else 'off'}")

    timing = floor = None
    if ctx.goal is not None and ctx.measure and profile.provider == "CPUExecutionProvider":
        from retool.optimizers.goal import below_floor
        from retool.optimizers.latency import step_latency

        timing, floor = partial(step_latency, ctx), below_floor
    res = accuracy.search(build, lambda p: ctx.evaluate(p, tol, level), rank,
                          budget=ctx.budget if budget is None else budget,
                          label=f"{name}: ", impact=impact, timing=timing, floor=floor)
    if profile.method == "fp16":
        ok, msg = load_in_subprocess(res.path, "all")
        if not ok:
            warnings.append(f"onnxruntime CPU cannot load this fp16 model at graph level ALL ({msg}); "
                            f"on CPU use level EXTENDED (GPU providers are unaffected)")
    cand = Candidate(profile.name, res.path, profile.precision, res.passed, res.checks, tools, versions, warnings,
                     res.excluded, res.attempts, calibrated, n_calib, method if calibrated else None, profile, notes)
    # once per search: cpu-auto's plain builds per calibration method (budget 0) are screened, not diagnosed
    if (ctx.goal is not None and not res.passed and budget != 0 and profile.method == "static"
            and profile.quant_format == "QDQ"):
        cand.extra["precision_bound"] = _precision_bound(ctx, tol, build, base, name)
    return cand


def _precision_bound(ctx: Context, tol, build, base: Path, name: str) -> dict | None:
    """A goal the search missed: what int8 weights and 8-bit activations each keep alone (best effort)."""
    from retool.optimizers import accuracy, precision_bound

    try:
        with console.step(f"{name}: the goal with only the weights, then only the activations, in int8"):
            plain = build([], "bound")
            try:
                # unoptimised: onnxruntime's basic level re-quantizes a float weight between QDQ pairs
                # (WeightBiasQuantization, per tensor), which is not the half being measured
                bound = precision_bound.measure(plain, base, lambda p: ctx.evaluate(p, tol, "disable"), ctx.workdir,
                                                ctx.goal, ctx.external)
            finally:
                accuracy._remove_onnx(plain)
    except Exception as exc:  # a diagnosis; the goal's verdict stands without it, and the failure is said
        console.warn(f"{name}: why the goal was missed could not be measured ({_first_line(exc)})")
        return {"error": _first_line(exc)}
    precision_bound.log(bound, f"{name}: ")
    return bound


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


def resolve_tolerance(profile, tolerance):
    from retool.validators.parity import Tolerance

    if tolerance is None:
        return profile.tolerance
    if isinstance(tolerance, Tolerance):
        return tolerance
    if isinstance(tolerance, Mapping):
        bad = set(tolerance) - {"atol", "rtol", "min_cosine", "min_top1", "confidence"}
        if bad:
            raise UsageError(f"tolerance: unknown key(s) {', '.join(sorted(bad))}; use atol, rtol, min_cosine, min_top1")
        return dataclasses.replace(profile.tolerance, **dict(tolerance))
    raise UsageError(f"tolerance: expected a Tolerance or a mapping, got {type(tolerance).__name__}")


def check_loads_path(path, target: str) -> None:
    check_loads(Candidate(target, Path(path), "", True, []))


def check_loads(cand: Candidate) -> None:
    from retool.runtime import make_session

    try:
        make_session(cand.path, level="extended" if cand.precision == "fp16" else "all")
    except Exception as exc:
        raise OptimizationError(f"{cand.path.name}: the {cand.target} model does not load in onnxruntime "
                                f"({_first_line(exc)})") from exc
