"""What the figures were measured on: recorded in every result file."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata

from retool.machine import parse_cpuinfo
from retool.meminfo import meminfo_bytes

#: CPU flags that decide which int8 / fp16 kernels ONNX Runtime can use.
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_tile",
         "f16c", "avx512_fp16", "asimd", "asimddp", "i8mm")
PACKAGES = ("retool", "onnxruntime", "onnx", "torch", "tensorflow", "keras", "tf2onnx", "opencv-python-headless",
            "numpy", "onnxsim", "openvino", "nncf", "onnxruntime-genai")


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        with open("/proc/cpuinfo") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return parse_cpuinfo("")


def room_for(work, disk_bytes: int, mem_bytes: int, disk_why: str, what: str) -> str | None:
    """Why a large-model case cannot run at ``work`` (too little disk or memory), or None."""
    import shutil

    free = shutil.disk_usage(work).free
    if free < disk_bytes:
        return (f"{work}: {free / 1e9:.1f} GB free, {what} needs {disk_bytes / 1e9:.1f} GB ({disk_why}); "
                f"use --work-dir")
    avail = meminfo_bytes("MemAvailable")
    if avail is not None and avail < mem_bytes:
        return f"{avail / 2**30:.1f} GiB memory available, {what} needs about {mem_bytes / 2**30:.1f} GiB"
    return None


def _git_commit(root) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def machine_info(root=None, gemm_threads: int | None = None) -> dict:
    """The machine; with ``gemm_threads``, also its GEMM limit (bench/gemm.py: fp32 and u8s8 GOP/s)."""
    model, flags = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    out = {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_flags": {f: f in flags for f in FLAGS if flags},
        "mem_total_bytes": meminfo_bytes("MemTotal"),
        "loadavg_at_start": [round(x, 2) for x in load] if load else None,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "versions": versions(),
        "git_commit": _git_commit(root) if root else None,
    }
    if gemm_threads:
        from bench.gemm import limit

        out["gemm_limit"] = limit(gemm_threads)
    return out


def short_description(m: dict) -> str:
    flags = [f for f, on in (m.get("cpu_flags") or {}).items() if on and f in ("avx2", "avx512f", "avx512_vnni",
                                                                               "avx_vnni", "amx_int8")]
    mem = m.get("mem_total_bytes")
    v = m.get("versions") or {}
    return (f"{m.get('cpu_model')}, {m.get('cpus_usable')} cores, "
            f"{mem / 2**30:.0f} GiB RAM" if mem else f"{m.get('cpu_model')}, {m.get('cpus_usable')} cores") + (
        f", {'/'.join(flags)}" if flags else "") + f"; onnxruntime {v.get('onnxruntime')}, torch {v.get('torch')}" + (
        _gemm_text(m["gemm_limit"]) if "gemm_limit" in m else "")


def _gemm_text(g: dict) -> str:
    if "fp32_gops" not in g:
        return f"; GEMM limit not measured ({g.get('reason', '?')})"
    s = g["u8s8_speedup_over_fp32"]
    return (f"; GEMM limit at {g['threads']} thread(s): fp32 {g['fp32_gops']['median']:.0f}, u8s8 "
            f"{g['u8s8_gops']['median']:.0f} GOP/s (int8 {s['estimate']:.2f}x fp32, 95% CI {s['ci95'][0]:.2f}-"
            f"{s['ci95'][1]:.2f})")


def section_start():
    """Start watching a section (retool.machine): pass the result to :func:`section_machine`."""
    from retool import machine

    return machine.Block(machine._readers).start()


def section_machine(info: dict, block) -> dict:
    """A section's ``machine``: the CPU, plus load, steal, other processes' CPU share during the
    section, and ``busy`` with the advice when the machine was busier than its cores."""
    from retool import machine

    during = block.end()
    static = machine.static_info()
    busy = machine.busy(during.get("loadavg"), during["cores"], during.get("others_cpu_pct"))
    return {**{k: info.get(k) for k in ("cpu_model", "cpus_usable", "mem_total_bytes")},
            "isa": static["isa"], "governor": static["governor"], "loadavg": during.get("loadavg"),
            "steal_pct": during.get("steal_pct"), "others_cpu_pct": during.get("others_cpu_pct"),
            "busy": busy, "advice": machine.ADVICE if busy else None}
