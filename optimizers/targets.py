"""Target profiles: one frozen dataclass per place a model will run.

Adding a target is one definition here, one line in ``retool.registry.TARGETS``
and its test. Nothing heavy is imported: ``retool targets`` lists these fast.

Data-type choices follow the guidance in onnxruntime's ``quantize_static``
docstring (ORT 1.32): x86 without VNNI -> U8S8 with ``reduce_range``; ARM ->
S8S8; TensorRT -> symmetric int8 activations and weights, per-channel weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

from retool.validators.parity import DEFAULT_TOLERANCES, Tolerance

#: How a profile changes the model.
METHODS = ("graph", "static", "dynamic", "fp16", "auto", "weight_only")


@dataclass(frozen=True)
class TargetProfile:
    name: str
    summary: str
    method: str = "graph"  # graph | static | dynamic | fp16 | auto
    precision: str = "fp32"  # precision of the result: fp32 | int8 | uint8 | fp16 | auto
    provider: str = "CPUExecutionProvider"
    quant_format: str | None = None  # QDQ | QOperator (quantized targets)
    per_channel: bool = False
    activation_type: str | None = None  # int8 | uint8
    weight_type: str | None = None  # int8 | uint8
    symmetric_activations: bool = False
    symmetric_weights: bool = True
    reduce_range: bool = False
    #: Op types to quantize; empty = everything the quantizer supports.
    op_types: tuple[str, ...] = ()
    #: ORT offline graph level saved in the file: disable | basic | extended (never "all":
    #: its NCHWc layouts are specific to the CPU that wrote them).
    graph_level: str = "extended"
    #: Run onnxsim / onnxoptimizer first (skipped for models with external data).
    simplify: bool = True
    tolerance: Tolerance = field(default_factory=Tolerance)
    #: cpu-auto: the targets it builds, measures and chooses from.
    candidates: tuple[str, ...] = ()
    #: Extra onnxruntime quantizer options (extra_options of quantize_static).
    extra_options: Mapping[str, object] = field(default_factory=dict)
    #: CPU architecture the target is meant for (x86_64 | arm64); None = any.
    arch: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"target {self.name}: method {self.method!r} not in {METHODS}")
        if self.method == "static" and self.quant_format not in ("QDQ", "QOperator"):
            raise ValueError(f"target {self.name}: static quantization needs quant_format QDQ or QOperator")

    @property
    def quantized(self) -> bool:
        return self.method in ("static", "dynamic")

    def describe(self) -> str:
        """One line saying what the profile does, for ``retool targets``."""
        if self.method == "graph":
            how = f"fp32, ORT graph level {self.graph_level} saved offline"
        elif self.method == "fp16":
            how = "fp16 weights and compute, fp32 IO kept"
        elif self.method == "weight_only":
            o = self.extra_options
            how = (f"weight-only int{o.get('bits')} MatMulNBits, {o.get('algorithm', 'rtn')} (block {o.get('block_size')}, "
                   f"{'symmetric' if o.get('symmetric', True) else 'asymmetric'}, accuracy_level "
                   f"{o.get('accuracy_level')}); activations stay float; decoders gated on generation")
        elif self.method == "auto":
            how = (f"builds {', '.join(self.candidates)} (static ones with minmax, percentile and entropy "
                   f"calibration); keeps the fastest that passes, never an int8 slower than fp32")
        else:
            acts = f"{'sym' if self.symmetric_activations else 'asym'} {self.activation_type} activations"
            wts = (f"{'sym' if self.symmetric_weights else 'asym'} {self.weight_type} weights "
                   f"{'per-channel' if self.per_channel else 'per-tensor'}")
            ops = ", ".join(self.op_types) if self.op_types else "all supported ops"
            rr = ", reduce_range" if self.reduce_range else ""
            if self.arch == "x86_64" and self.method == "static" and self.activation_type == "uint8":
                rr = ", reduce_range where the CPU lacks VNNI"
            kind = "dynamic" if self.method == "dynamic" else f"static {self.quant_format}"
            how = (f"{kind}: {acts}, {wts}{rr}; ops: {ops}" if self.method == "static"
                   else f"{kind}: {wts}{rr}; ops: {ops}")
        return how

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tolerance"] = self.tolerance.to_dict()
        d["extra_options"] = dict(self.extra_options)
        return d


_INT8_TOL = DEFAULT_TOLERANCES["int8"]

CPU = TargetProfile(
    "cpu", "fp32, graph-optimised offline; runs on any CPU", method="graph", precision="fp32",
    graph_level="extended", tolerance=DEFAULT_TOLERANCES["fp32"],
)

CPU_INT8 = TargetProfile(
    "cpu-int8", "static int8 QDQ U8S8 for x86, per-channel weights; reduce_range only without VNNI", method="static",
    precision="int8", quant_format="QDQ", per_channel=True, activation_type="uint8", weight_type="int8",
    symmetric_activations=False, symmetric_weights=True, reduce_range=True, graph_level="basic",
    tolerance=_INT8_TOL, arch="x86_64",
)

CPU_INT8_DYNAMIC = TargetProfile(
    "cpu-int8-dynamic", "dynamic int8 of MatMul / attention / LSTM weights and embedding tables, for transformers "
    "and RNNs; encoders get ORT's transformer fusions when they measure faster",
    method="dynamic", precision="int8", quant_format="QOperator", per_channel=False, activation_type="uint8",
    weight_type="int8", symmetric_weights=True,
    op_types=("MatMul", "Gemm", "Attention", "LSTM", "GRU", "Gather", "EmbedLayerNormalization"),
    graph_level="basic", tolerance=_INT8_TOL,
)

ARM64_INT8 = TargetProfile(
    "arm64-int8", "static int8 QDQ (S8S8) for ARM64 NEON / dot-product kernels, per-channel weights",
    method="static", precision="int8", quant_format="QDQ", per_channel=True, activation_type="int8",
    weight_type="int8", symmetric_activations=False, symmetric_weights=True, reduce_range=False,
    graph_level="basic", tolerance=_INT8_TOL, arch="arm64",
)

GPU_FP16 = TargetProfile(
    "gpu-fp16", "fp16 for CUDA / TensorRT GPUs, fp32 inputs and outputs kept", method="fp16", precision="fp16",
    provider="CUDAExecutionProvider", graph_level="basic", tolerance=DEFAULT_TOLERANCES["fp16"],
)

TENSORRT_INT8 = TargetProfile(
    "tensorrt-int8", "symmetric int8 QDQ with per-channel weights, as TensorRT explicit quantization expects",
    method="static", precision="int8", provider="TensorrtExecutionProvider", quant_format="QDQ", per_channel=True,
    activation_type="int8", weight_type="int8", symmetric_activations=True, symmetric_weights=True,
    reduce_range=False, graph_level="basic", tolerance=_INT8_TOL,
)

NPU_UINT8 = TargetProfile(
    "npu-uint8", "per-tensor asymmetric uint8 QDQ, for edge NPUs / DSPs that need it", method="static",
    precision="uint8", quant_format="QDQ", per_channel=False, activation_type="uint8", weight_type="uint8",
    symmetric_activations=False, symmetric_weights=False, reduce_range=False, graph_level="basic",
    tolerance=DEFAULT_TOLERANCES["uint8"],
)

CPU_AUTO = TargetProfile(
    "cpu-auto", "measure cpu, cpu-int8 and cpu-int8-dynamic here; keep the fastest that passes", method="auto",
    precision="auto", candidates=("cpu-int8", "cpu-int8-dynamic", "cpu"), tolerance=_INT8_TOL,
)


# Weight-only targets for decoders (issue 16). The gate: tolerance.min_top1 is the teacher-forced
# top-1 agreement over the generated steps, min_cosine the minimum per-step logit cosine.
# max_ppl_ratio: the candidate's perplexity over fp32's on held-out text (validators/perplexity.py).
# The int4 default algorithm is chosen by measurement (docs/optimize.md, "Choosing the int4 algorithm").
CPU_INT4 = TargetProfile(
    "cpu-int4", "weight-only int4 (MatMulNBits, block 32) for decoder LLMs and other MatMul-heavy models",
    method="weight_only", precision="int4", graph_level="disable", simplify=False,
    tolerance=Tolerance(atol=None, rtol=None, min_cosine=0.98, min_top1=31 / 32),
    extra_options={"bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 4, "free_running": False,
                   "algorithm": "gptq", "max_ppl_ratio": 1.05},
)

CPU_INT8_WEIGHT = TargetProfile(
    "cpu-int8-weight", "weight-only int8 (MatMulNBits, block 32): each row independent of the batch, unlike "
    "dynamic int8", method="weight_only", precision="int8", graph_level="disable", simplify=False,
    tolerance=Tolerance(atol=None, rtol=None, min_cosine=0.999, min_top1=1.0),
    extra_options={"bits": 8, "block_size": 32, "symmetric": True, "accuracy_level": 4, "free_running": True,
                   "algorithm": "rtn", "max_ppl_ratio": 1.05},
)

#: options a weight-only target takes as ``cpu-int4:algorithm=hqq,accuracy_level=0``: key -> (parser, what)
WEIGHT_ONLY_OPTIONS = {
    "algorithm": (str, "rtn, gptq or hqq"), "accuracy_level": (int, "0 (unset), 1 fp32, 2 fp16, 3 bf16, 4 int8"),
    "block_size": (int, "16, 32, 64, 128 or 256"), "symmetric": ("bool", "true or false"),
    "free_running": ("bool", "true or false"), "max_ppl_ratio": (float, "a ratio >= 1 or none"),
    "new_tokens": (int, "1 to 512"), "heldout": (str, "an .npy/.npz of token ids"),
}


def with_options(profile: TargetProfile, text: str) -> TargetProfile:
    """``profile`` with ``key=value,...`` from a target spec applied to its extra_options (weight-only targets)."""
    from retool.errors import UsageError

    if profile.method != "weight_only":
        raise UsageError(f"--target {profile.name}:{text}: only weight-only targets (cpu-int4, cpu-int8-weight) "
                         f"take options")
    opts = dict(profile.extra_options)
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, eq, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if key not in WEIGHT_ONLY_OPTIONS or not eq:
            raise UsageError(f"--target {profile.name}:{text}: {item!r} is not an option; give key=value with "
                             f"key one of {', '.join(WEIGHT_ONLY_OPTIONS)}")
        kind, what = WEIGHT_ONLY_OPTIONS[key]
        try:
            if raw.lower() == "none" and key in ("max_ppl_ratio", "accuracy_level", "heldout"):
                val = None
            elif kind == "bool":
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                val = raw.lower() in ("true", "1", "yes")
            else:
                val = kind(raw)
        except ValueError:
            raise UsageError(f"--target {profile.name}: {key}={raw!r}: give {what}") from None
        ok = {"algorithm": lambda v: v in ("rtn", "gptq", "hqq"),
              "accuracy_level": lambda v: v is None or 0 <= v <= 4,
              "block_size": lambda v: v in (16, 32, 64, 128, 256),
              "max_ppl_ratio": lambda v: v is None or v >= 1.0, "new_tokens": lambda v: 1 <= v <= 512}
        if key in ok and not ok[key](val):
            raise UsageError(f"--target {profile.name}: {key}={raw!r}: give {what}")
        opts[key] = val
    if opts.get("algorithm") == "gptq" and opts.get("bits") != 4:
        raise UsageError(f"--target {profile.name}: algorithm=gptq writes MatMulNBits only for 4 bits; use rtn or hqq")
    return dataclasses.replace(profile, extra_options=opts)


def get_target(name: str) -> TargetProfile:
    """The profile registered under ``name`` (UsageError listing the known ones otherwise)."""
    from retool.registry import TARGETS

    base, _, opts = name.partition(":")
    return with_options(TARGETS.get(base), opts) if opts else TARGETS.get(name)


def all_targets() -> list[TargetProfile]:
    from retool.registry import TARGETS

    return [TARGETS.get(n) for n in TARGETS.names()]
