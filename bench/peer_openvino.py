"""OpenVINO as a peer in bench's ``peers`` section: what an x86 CPU user picks instead of ONNX Runtime.

Variants, built from the same fp32 ONNX file and the same calibration samples as retool and the
plain-ORT peer, and timed in the same interleaved loop:

- ``OpenVINO fp32``: ``ov.convert_model`` of the ONNX file, compiled with ``INFERENCE_PRECISION_HINT=f32``;
- ``OpenVINO NNCF int8``: ``nncf.quantize`` on that model (first 32 calibration samples, OverflowFix
  ``first_layer_only``: 7-bit weights in each input's first layer), non-quantized ops kept in f32;
- ``OpenVINO default hint``: only where the CPU's default inference precision is not f32 (bf16 on AMX):
  the fp32 model as an OpenVINO user gets it without settings.

The extra ``bench`` installs it (``pip install -c constraints.txt '.[bench]'``); without it the
variants are skipped with that reason. :func:`behind` is the BEHIND PEER rule.
"""
from __future__ import annotations

import time
from pathlib import Path

INSTALL = "pip install -c constraints.txt '.[bench]' (make bench does)"
#: NNCF's OverflowFix for the int8 variant (its documented choice for AVX2 / AVX-512 CPUs)
OVERFLOW_FIX = "first_layer_only"
FP32, INT8, DEFAULT = "OpenVINO fp32", "OpenVINO NNCF int8", "OpenVINO default hint"
CALIBRATION_SAMPLES = 32  # what the plain-ORT peer calibrates on


def missing() -> str | None:
    """Why the OpenVINO peer cannot run here, or None."""
    for mod in ("openvino", "nncf"):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is not installed: {INSTALL}"
    return None


def _size(xml: Path) -> int:
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


class Peers:
    """The OpenVINO variants of one model: ``info`` (recorded as the result's ``openvino``), and
    ``runner(label, threads)`` -> ``feeds -> outputs``."""

    def __init__(self, info: dict, models: dict | None = None, hints: dict | None = None, input_name: str = ""):
        self.info, self.models, self.hints, self.input_name = info, models or {}, hints or {}, input_name
        self._compiled: dict = {}

    @property
    def labels(self) -> list[str]:
        return list(self.models)

    def runner(self, label: str, threads: int):
        import openvino as ov

        key = (label, threads)
        if key not in self._compiled:
            # no pinning: ORT does not pin either, and on a shared machine a pinned thread waits for its core
            cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                   "ENABLE_CPU_PINNING": False}
            if self.hints.get(label):
                cfg["INFERENCE_PRECISION_HINT"] = self.hints[label]
            self._compiled[key] = ov.Core().compile_model(self.models[label], "CPU", cfg)
        req = self._compiled[key].create_infer_request()

        def run(feeds):
            req.infer(feeds)
            return [req.get_output_tensor(0).data.copy()]
        return run


def build(kind: str, fp32: Path, calib, input_name: str, work: Path) -> Peers:
    """The OpenVINO variants of ``fp32``; ``info["status"]`` says skipped (extra absent) or error."""
    why = missing()
    if why:
        return Peers({"status": "skipped", "reason": why})
    try:
        return _build(kind, fp32, calib, input_name, work)
    except Exception as exc:  # a result too: the peer could not build this model
        return Peers({"status": "error", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"})


def _build(kind: str, fp32: Path, calib, input_name: str, work: Path) -> Peers:
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    work.mkdir(parents=True, exist_ok=True)
    core = ov.Core()
    default_hint = core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()  # bf16 on AMX
    t0 = time.perf_counter()
    model = ov.convert_model(str(fp32))
    fp32_s = time.perf_counter() - t0
    ov.save_model(model, str(work / "ov-fp32.xml"), compress_to_fp16=False)

    t0 = time.perf_counter()
    data = nncf.Dataset(list(calib[:CALIBRATION_SAMPLES]), lambda x: {input_name: x[None]})
    q = nncf.quantize(model, data, subset_size=CALIBRATION_SAMPLES,
                      model_type=None if kind == "cnn" else nncf.ModelType.TRANSFORMER,
                      advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix(OVERFLOW_FIX)))
    int8_s = time.perf_counter() - t0
    ov.save_model(q, str(work / "ov-int8.xml"), compress_to_fp16=False)

    versions = {"openvino": ov.get_version().split("-")[0], "nncf": nncf.__version__}
    info = {"status": "ok", "versions": versions, "cpu_default_inference_precision": default_hint,
            "shapes": "as converted from the ONNX file (dynamic), like the ORT sessions",
            "compile": "CPU, PERFORMANCE_HINT=LATENCY, NUM_STREAMS=1, INFERENCE_NUM_THREADS=threads, ENABLE_CPU_PINNING=false",
            "variants": {
                FP32: {"build_s": round(fp32_s, 2), "how": "ov.convert_model(onnx), INFERENCE_PRECISION_HINT=f32",
                       "size_bytes": _size(work / "ov-fp32.xml")},
                INT8: {"build_s": round(int8_s, 2), "size_bytes": _size(work / "ov-int8.xml"),
                       "how": f"nncf.quantize(subset_size={CALIBRATION_SAMPLES}, overflow_fix={OVERFLOW_FIX}"
                              f"{', model_type=TRANSFORMER' if kind != 'cnn' else ''}), INFERENCE_PRECISION_HINT=f32"}}}
    models, hints = {FP32: model, INT8: q}, {FP32: "f32", INT8: "f32"}
    if default_hint not in ("f32", "undefined", ""):
        models[DEFAULT], hints[DEFAULT] = model, None
        info["variants"][DEFAULT] = {"build_s": round(fp32_s, 2), "size_bytes": _size(work / "ov-fp32.xml"),
                                     "how": f"the fp32 model with the CPU's default hint ({default_hint})"}
    return Peers(info, models, hints, input_name)


def behind(times: dict, accuracy: dict, retool: list[str], peers: list[str], tolerance: float) -> dict:
    """For each peer variant: retool's fastest variant at least as accurate (within ``tolerance``), and
    whether the peer is faster than it beyond the noise (retool.speed.decide on the paired-ratio interval:
    the whole 95 % interval of retool ÷ peer latency above 1 + NOISE_FLOOR) -- BEHIND PEER."""
    import statistics

    from retool.speed import NOISE_FLOOR, PASS, decide, paired_ratio_interval, rule_text

    out = {}
    for p in peers:
        ok = [k for k in retool if accuracy[k] >= accuracy[p] - tolerance]
        if not ok:
            out[p] = {"retool_best": None, "behind": True,
                      "why": f"no retool variant reaches {p}'s accuracy {accuracy[p]:.5f}"}
            continue
        best = min(ok, key=lambda k: statistics.median(times[k]))
        est, lo, hi = paired_ratio_interval(times[best], times[p])  # > 1: the peer is faster
        d = decide(est, lo, hi, 1.0 + NOISE_FLOOR, higher_is_better=True, rule=rule_text("ratio"),
                   samples=min(len(times[best]), len(times[p])))
        out[p] = {"retool_best": best, "peer_speedup_over_retool": d.to_dict(), "behind": d.outcome == PASS,
                  "why": f"{p} over {best}: {d.text}"}
    return out
