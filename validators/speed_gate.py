"""The default gate for quantized models: not slower than the reference beyond the noise.

Quantization can make a model slower (quantize/dequantize overhead on small or
thin models), and a slower int8 model must not be published as "ok". The gate
runs at every measured batch size; "slower" means the speed-up's 95 % paired
bootstrap interval lies entirely below 1/(1 + 2 %) (retool.speed, validators/decide_gates.py);
an interval that straddles it is undecided, which passes unless --undecided fail. Gates(not_slower=False) switches it off,
and the report says so.

Latency measured on a CPU says nothing about a target built for other hardware
(TensorRT, CUDA, an ARM64 CPU): there the gate is not applied and the report
says where the figures were measured.
"""
from __future__ import annotations

import platform
from typing import Any, Mapping

from retool.types import CheckResult

QUANTIZED = ("int8", "uint8", "int4", "uint4")


def measured_off_target(target: str | None, session_providers) -> str | None:
    """A sentence when the latency was not measured on ``target``'s hardware, else None."""
    if not target:
        return None
    try:
        from retool.optimizers.targets import get_target

        profile = get_target(target)
    except Exception:  # an unknown or custom target name: nothing to say
        return None
    used = list(session_providers or ["CPUExecutionProvider"])
    where = used[0].replace("ExecutionProvider", "") if used else "CPU"
    if profile.provider not in used:
        hw = {"TensorrtExecutionProvider": "TensorRT", "CUDAExecutionProvider": "CUDA"}.get(
            profile.provider, profile.provider.replace("ExecutionProvider", ""))
        return (f"measured on {where}, not on {hw} where {target} runs: these latencies say nothing "
                f"about its speed there")
    if target.startswith("arm64") and platform.machine().lower() not in ("aarch64", "arm64"):
        return (f"measured on {platform.machine()}, not on the ARM64 CPU {target} is built for: these "
                f"latencies say nothing about its speed there")
    return None


def applies(gates, precision: str | None) -> bool:
    """Whether the not-slower gate is on: explicitly, or by default for quantized candidates."""
    if gates.not_slower is not None:
        return bool(gates.not_slower)
    return (precision or "") in QUANTIZED


def not_slower_checks(gates, precision: str | None, latency: Mapping[str, Any] | None) -> list[CheckResult]:
    from retool.validators import decide_gates as dg

    lat = latency or {}
    if not applies(gates, precision) or lat.get("off_target"):
        return []
    out = []
    for b in sorted((lat.get("speedup_stats") or {}), key=int):
        stored = ((lat.get("decisions") or {}).get(str(b)) or {}).get(f"not-slower@batch{b}")
        if stored is not None:
            d = dg.from_stored(stored)
        else:  # a decoder report: judged on the kept samples
            s = {k: ((lat.get(k) or {}).get(str(b)) or {}).get("samples_ms") for k in ("candidate", "reference")}
            if not (s["candidate"] and s["reference"]):
                continue
            d = dg.decisions_at(int(b), s, gates, not_slower=True)[f"not-slower@batch{b}"]
        final = dg.resolved(f"not-slower@batch{b}", d, gates)
        ok = final.outcome == "pass"
        msg = ""
        if not ok:
            msg = (f"{final.text}: slower than the reference at batch {b}; keep the fp32 model, or switch this "
                   f"gate off with not_slower: false (--allow-slower)")
        elif d.outcome == "undecided":
            msg = final.text
        out.append(CheckResult(
            f"not-slower@batch{b}", ok, round(d.estimate, 6), round(d.threshold, 6), msg,
            {"unit": "x", "op": "not slower", "iqr": (lat["speedup_stats"][b] or {}).get("iqr"),
             "verdict": (lat["speedup_stats"][b] or {}).get("verdict"), "outcome": d.outcome,
             "decision": final.to_dict(), "interval": d.to_dict()["interval"]}))
    return out


def gate_note(gates, precision: str | None, latency: Mapping[str, Any] | None) -> str | None:
    """What the report says about the gate when it did not run."""
    lat = latency or {}
    if gates.not_slower is False and (precision or "") in QUANTIZED:
        return "the not-slower-than-reference gate for quantized models was switched off (not_slower: false)"
    if applies(gates, precision):
        if lat.get("off_target"):
            return f"the not-slower gate was not applied: latency {lat['off_target']}"
        if not lat.get("speedup_stats"):
            return ("the not-slower gate for quantized models was not applied: no latency against a reference "
                    "was measured (give --reference and --latency)")
    return None
