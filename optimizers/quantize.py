"""int8 / uint8 quantization with onnxruntime: pre-process, calibrate once, quantize.

Calibration runs once and its ranges are cached (``calibration_cache_path``),
so the accuracy-aware retries only re-run the cheap quantization pass.
Samples are fed in chunks and each chunk's raw activations are reduced before
the next one is read: memory stays bounded for MinMax, Entropy and Percentile.
(ORT's own ``max_intermediate_outputs`` option is not used: in ORT 1.32 the MinMax
calibrator clears the collected outputs at that count without reducing them first,
so every range would come from the last partial chunk only.)
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from retool import console
from retool.errors import OptimizationError, first_line

#: one-line error text; this module keeps its own length limit
_first_line = partial(first_line, limit=200)

#: Samples per calibrator pass: raw activations of this many samples are held at once.
CHUNK = 8
METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
#: ORT's default percentile for the Percentile calibrator.
DEFAULT_PERCENTILE = 99.999


def method_label(method: str, percentile: float | None = None) -> str:
    """How a calibration method is named in reports: ``minmax``, ``percentile(99.99)``."""
    if method == "percentile":
        return f"percentile({percentile if percentile is not None else DEFAULT_PERCENTILE:g})"
    return method


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


def _quiet_ort_logs() -> None:
    # The quantizer logs a warning per tensor on some graphs; our report says what matters.
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))


def preprocess(src, dst, external: bool = False) -> list[str]:
    """Symbolic shape inference + ORT basic optimisation before quantization.

    Symbolic shape inference fails on some BERT-like graphs; retry without it,
    then fall back to the model as it is (with a warning).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    warnings = []
    src, dst = Path(src).resolve(), Path(dst).resolve()
    kw = dict(save_as_external_data=external, all_tensors_to_one_file=True,
              external_data_location=dst.name + ".data" if external else None)
    for skip_symbolic in (False, True):
        try:
            # symbolic shape inference leaves temp files in the working directory when it fails
            with _cwd(dst.parent):
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic, **kw)
            if skip_symbolic:
                warnings.append("symbolic shape inference failed on this graph; pre-processed without it")
            return warnings
        except Exception as exc:  # the pre-process raises anything; it is an optimisation, not a must
            last = exc
    warnings.append(f"quantization pre-process failed ({str(last).splitlines()[0][:160] if str(last) else type(last).__name__}); "
                    f"quantizing the model as it is")
    _copy_onnx(src, dst)
    return warnings


def _no_stdout():
    """ORT's histogram calibrators print progress to stdout, which would corrupt ``--json`` output."""
    import io

    return contextlib.redirect_stdout(io.StringIO())


@contextlib.contextmanager
def _cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _copy_onnx(src, dst) -> None:
    import onnx

    from retool.fsutil import external_data_files

    if external_data_files(src):
        m = onnx.load(str(src))
        onnx.save(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=Path(dst).name + ".data")
    else:
        shutil.copyfile(src, dst)


def calibrate(model_path, samples: Iterator[dict[str, np.ndarray]], profile, method: str, cache_path,
              workdir, external: bool = False, chunk: int = CHUNK, percentile: float | None = None) -> int:
    """Collect activation ranges over ``samples`` and save them to ``cache_path``. Returns the sample count."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    from retool.optimizers.calibration import StreamingReader

    _quiet_ort_logs()
    calib_method = getattr(CalibrationMethod, METHODS[method])
    options = {"symmetric": bool(profile.symmetric_activations)}
    if method == "percentile":
        options["percentile"] = float(percentile if percentile is not None else DEFAULT_PERCENTILE)
    try:
        calibrator = create_calibrator(Path(model_path), list(profile.op_types) or None,
                                       augmented_model_path=str(Path(workdir) / "augmented.onnx"),
                                       calibrate_method=calib_method, use_external_data_format=external,
                                       extra_options=options)
    except Exception as exc:
        raise OptimizationError(f"{model_path}: cannot prepare calibration ({_first_line(exc)})") from exc
    if method in ("percentile", "entropy"):  # numpy's bins fail on a mask's -3.4e38 (optimizers.histogram)
        from retool.optimizers.histogram import safe_collector

        calibrator.collector = safe_collector(calibrator)
    total = 0
    shown = [0]

    def progress(n):
        if total + n - shown[0] >= 64:  # large sets only; a few samples finish in a blink
            shown[0] = total + n
            console.info(f"\n  … {shown[0]} samples calibrated")

    while True:
        reader = StreamingReader(samples, limit=chunk, on_sample=progress)
        try:
            with _no_stdout():
                calibrator.collect_data(reader)
        except ValueError as exc:
            if reader.count == 0:  # "No data is collected": the iterator ran dry on a chunk boundary
                break
            raise OptimizationError(f"{model_path}: calibration failed ({_first_line(exc)})") from exc
        except Exception as exc:
            from retool.errors import RetoolError

            if isinstance(exc, RetoolError):
                raise
            raise OptimizationError(f"{model_path}: calibration failed ({_first_line(exc)})") from exc
        total += reader.count
        if reader.exhausted or reader.count < chunk:
            break
    if total == 0:
        raise OptimizationError(f"{model_path}: no calibration samples were read")
    with _no_stdout():
        save_tensors_data(calibrator.compute_data(), cache_path)
    del calibrator
    return total


def quantize_static(model_path, out, profile, cache_path, method: str, exclude: Sequence[str] = (),
                    external: bool = False) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static as ort_quantize_static

    _quiet_ort_logs()
    extra = {"ActivationSymmetric": bool(profile.symmetric_activations),
             "WeightSymmetric": bool(profile.symmetric_weights), **dict(profile.extra_options)}
    try:
        ort_quantize_static(
            str(model_path), str(out), calibration_data_reader=None,
            quant_format=getattr(QuantFormat, profile.quant_format),
            op_types_to_quantize=list(profile.op_types) or None, per_channel=profile.per_channel,
            reduce_range=profile.reduce_range, activation_type=_qtype(profile.activation_type),
            weight_type=_qtype(profile.weight_type), nodes_to_exclude=list(exclude),
            use_external_data_format=external,
            calibrate_method=getattr(CalibrationMethod, METHODS[method]), extra_options=extra,
            calibration_cache_path=str(cache_path),
        )
    except Exception as exc:
        raise OptimizationError(f"{model_path}: static quantization for {profile.name} failed "
                                f"({_first_line(exc)})") from exc


def quantize_dynamic(model_path, out, profile, exclude: Sequence[str] = (), external: bool = False) -> None:
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    _quiet_ort_logs()
    try:
        ort_quantize_dynamic(
            str(model_path), str(out), op_types_to_quantize=list(profile.op_types) or None,
            per_channel=profile.per_channel, reduce_range=profile.reduce_range,
            weight_type=_qtype(profile.weight_type), nodes_to_exclude=list(exclude),
            use_external_data_format=external,
            extra_options={"WeightSymmetric": bool(profile.symmetric_weights), **dict(profile.extra_options)},
        )
    except Exception as exc:
        raise OptimizationError(f"{model_path}: dynamic quantization for {profile.name} failed "
                                f"({_first_line(exc)})") from exc


def saturation_variants(profile, model_path) -> dict:
    """The ways around u8s8 saturation on x86 without VNNI, each a profile: 7-bit weights everywhere (ORT's
    guidance), full range, 7-bit weights on the first layer only (NNCF's OverflowFix idea: its inputs are
    the ones that fill the 8 bits), and U8U8. Static only; a dynamic target compares the first two."""
    import dataclasses

    out = {"reduce_range": dataclasses.replace(profile, reduce_range=True),
           "full range": dataclasses.replace(profile, reduce_range=False)}
    if profile.method != "static":
        return out
    w = first_layer_weight(model_path)
    if w:
        over = [{"axis": 0, "reduce_range": True}] if profile.per_channel else [{"reduce_range": True}]
        opts = {**dict(profile.extra_options), "TensorQuantOverrides": {w: over}}
        out["7-bit weights on the first layer"] = dataclasses.replace(profile, reduce_range=False, extra_options=opts)
    out["U8U8"] = dataclasses.replace(profile, reduce_range=False, weight_type="uint8", symmetric_weights=False)
    return out


def first_layer_weight(model_path) -> str | None:
    """The weight initializer of the first Conv / Gemm / MatMul in graph order, or None."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits:
            return n.input[1]
    return None


def quantizable_nodes(model_path, profile) -> list[str]:
    """Names of the nodes the quantizer for ``profile`` would touch (the fallback's candidates)."""
    import onnx
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry

    if profile.method == "dynamic":
        ops = set(IntegerOpsRegistry)
    elif profile.quant_format == "QDQ":
        ops = set(QDQRegistry) | set(QLinearOpsRegistry)
    else:
        ops = set(QLinearOpsRegistry)
    if profile.op_types:
        ops &= set(profile.op_types)
    m = onnx.load(str(model_path), load_external_data=False)
    return [n.name for n in m.graph.node if n.op_type in ops and n.name]


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}
