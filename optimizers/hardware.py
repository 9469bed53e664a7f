"""What the CPU can do for int8: read once from /proc/cpuinfo, recorded in every report.

ONNX Runtime's quantization guidance (docs/performance/model-optimizations/quantization.md)
depends on it: on x86 without VNNI, u8 x s8 products can saturate the 16-bit
intermediate (``vpmaddubsw``), so weights are quantized to 7 bits (``reduce_range``);
with VNNI (AVX512-VNNI or AVX-VNNI) the full 8 bits are safe and more accurate.
ARM uses S8S8; its dot-product (``asimddp``) and ``i8mm`` extensions are the fast paths.

``RETOOL_CPUINFO`` names another cpuinfo file (tests, or building for another machine);
``--tune-for`` in ``retool optimize`` picks a preset instead of this CPU.
"""
from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

#: x86 flags and ARM features that matter to int8 / fp16 kernels, as /proc/cpuinfo spells them.
X86_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16", "f16c")
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "sve", "bf16", "fphp")


@dataclass(frozen=True)
class CpuFeatures:
    arch: str  # x86_64 | arm64 | other
    model: str
    flags: frozenset[str]
    source: str = "/proc/cpuinfo"

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def vnni(self) -> bool:
        return self.arch == "x86_64" and (self.has("avx512_vnni") or self.has("avx_vnni"))

    @property
    def avx512(self) -> bool:
        return self.arch == "x86_64" and all(self.has(f) for f in ("avx512f", "avx512bw", "avx512vl"))

    @property
    def amx(self) -> bool:
        return self.arch == "x86_64" and self.has("amx_int8") and self.has("amx_tile")

    @property
    def dotprod(self) -> bool:
        return self.arch == "arm64" and self.has("asimddp")

    @property
    def kind(self) -> str:
        """One word for the int8 path this CPU takes: x86-amx, x86-vnni, x86-avx512, x86-avx2, arm64-i8mm ..."""
        if self.arch == "x86_64":
            if self.amx:
                return "x86-amx"
            if self.vnni:
                return "x86-vnni"
            if self.avx512:
                return "x86-avx512"
            return "x86-avx2" if self.has("avx2") else "x86"
        if self.arch == "arm64":
            if self.has("i8mm"):
                return "arm64-i8mm"
            return "arm64-dotprod" if self.dotprod else "arm64"
        return self.arch

    def to_dict(self) -> dict:
        known = X86_FLAGS if self.arch == "x86_64" else ARM_FEATURES if self.arch == "arm64" else ()
        return {"arch": self.arch, "model": self.model, "kind": self.kind, "source": self.source,
                "vnni": self.vnni, "avx512": self.avx512, "amx": self.amx, "dotprod": self.dotprod,
                "i8mm": self.arch == "arm64" and self.has("i8mm"),
                "flags": {f: self.has(f) for f in known}}


def parse_cpuinfo(text: str, source: str = "/proc/cpuinfo", machine: str | None = None) -> CpuFeatures:
    """Features of the first processor listed in a /proc/cpuinfo text."""
    model, flags, arm = "", None, False
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = val.strip()
        elif key == "flags" and flags is None:
            flags = frozenset(val.split())
        elif key == "features" and flags is None:
            flags, arm = frozenset(val.split()), True
        elif key == "cpu implementer":
            arm = True
            model = model or f"ARM implementer {val.strip()}"
    m = (machine or platform.machine()).lower()
    if flags is None:  # no cpuinfo (not Linux): only the architecture is known
        arch = "x86_64" if m in ("x86_64", "amd64") else "arm64" if m in ("aarch64", "arm64") else m or "other"
        return CpuFeatures(arch, model or platform.processor() or m, frozenset(), source)
    arch = "arm64" if arm else "x86_64"
    return CpuFeatures(arch, model or m, flags, source)


def detect(path: str | os.PathLike | None = None) -> CpuFeatures:
    """This CPU's features (or those in ``path`` / ``$RETOOL_CPUINFO``)."""
    p = str(path or os.environ.get("RETOOL_CPUINFO") or "/proc/cpuinfo")
    return _detect(p)


@lru_cache(maxsize=8)
def _detect(path: str) -> CpuFeatures:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return parse_cpuinfo("", f"{path} (unreadable)")
    # the real file's architecture is the machine's; a faked one says it itself
    return parse_cpuinfo(text, path, None if path == "/proc/cpuinfo" else "")


#: ``--tune-for`` presets: build for a CPU other than this one.
PRESETS = {
    "x86-avx2": CpuFeatures("x86_64", "preset: x86 AVX2, no VNNI", frozenset({"avx2", "fma", "f16c"}), "preset"),
    "x86-avx512": CpuFeatures("x86_64", "preset: x86 AVX-512, no VNNI",
                              frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"}), "preset"),
    "x86-vnni": CpuFeatures("x86_64", "preset: x86 AVX-512 VNNI",
                            frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
                            "preset"),
    "arm64-dotprod": CpuFeatures("arm64", "preset: ARM64 with dot-product", frozenset({"asimd", "asimddp"}), "preset"),
}


def resolve(tune_for: str | CpuFeatures | None) -> CpuFeatures:
    """``None`` / ``"here"``: this CPU; a preset name; a cpuinfo file path; or CpuFeatures as they are."""
    from retool.errors import UsageError

    if isinstance(tune_for, CpuFeatures):
        return tune_for
    if tune_for in (None, "", "here"):
        return detect()
    if tune_for in PRESETS:
        return PRESETS[tune_for]
    if Path(tune_for).is_file():
        return detect(tune_for)
    raise UsageError(f"--tune-for {tune_for!r}: use 'here', one of {', '.join(PRESETS)}, or a cpuinfo file")


def adapt(profile, cpu: CpuFeatures):
    """The profile as it should be built for ``cpu``, and the reasons for what changed.

    Only x86 U8S8 profiles (static cpu-int8, and dynamic int8, whose activations are u8 too) move:
    reduce_range on where VNNI is missing, off where it is present (ORT: "reduce_range is unnecessary
    on VNNI" and costs accuracy there). Measured on an AVX2 CPU, without it u8 x s8 saturates: a
    ResNet-18-sized CNN fell to top-1 0.14, a small encoder's dynamic int8 to cosine 0.93."""
    notes: list[str] = []
    if profile.method in ("static", "dynamic") and profile.arch in ("x86_64", None) \
            and profile.activation_type == "uint8" and profile.weight_type == "int8" and cpu.arch == "x86_64":
        want = not cpu.vnni
        if want != profile.reduce_range:
            profile = dataclasses.replace(profile, reduce_range=want)
        notes.append(f"U8S8 with reduce_range={'on' if want else 'off'}: the CPU it is tuned for ({cpu.kind}) "
                     f"{'lacks' if want else 'has'} VNNI" + (", so 8-bit u8 x s8 products could saturate"
                                                            if want else ", so full 8-bit weights are safe"))
    return profile, notes


def reduce_range_is_guidance(profile, cpu: CpuFeatures) -> bool:
    """reduce_range is on only because this x86 CPU lacks VNNI (adapt's choice), so measuring may overrule it."""
    return (profile.method in ("static", "dynamic") and cpu.arch == "x86_64" and not cpu.vnni
            and profile.activation_type == "uint8" and profile.weight_type == "int8")


def mismatch(profile, tuned: CpuFeatures, here: CpuFeatures) -> list[str]:
    """Sentences for a report made on one CPU for a target meant for another."""
    out = []
    want = getattr(profile, "arch", None)
    if want and want != here.arch:
        out.append(f"{profile.name} is meant for {want} CPUs; this report was made on {here.arch} ({here.model}): "
                   f"parity holds, but latency measured here says nothing about its speed there")
    elif want and tuned.arch == here.arch and tuned.kind != here.kind and profile.quantized:
        out.append(f"{profile.name} was tuned for {tuned.kind} ({tuned.model}) but measured on {here.kind} "
                   f"({here.model}): latency and accuracy here may differ from the CPU it is meant for")
    return out
