"""The TensorFlow case of the ``large_model`` section: a Keras MLP over 2 GiB through ``retool convert``.

The model has the torch MLP's shape (1024 -> (depth + 1) x width -> 1000), is built and saved
as ``.keras`` in one fresh process, and converted in another; the conversion takes tf2onnx's
large-model path (external data). Its peak RSS is divided by the ONNX model's size, as for torch.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from bench.machine import room_for
from bench.models import LARGE_DEPTH, LARGE_WIDTH, MLP_IN, MLP_OUT, mlp_param_count
from bench.proc import run_child

PY = sys.executable

BUILD = """
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras
width, depth, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
keras.utils.set_random_seed(0)
x = keras.Input(({mlp_in},), name="features")
h = keras.layers.Dense(width, activation="relu")(x)
for _ in range(depth):
    h = keras.layers.Dense(width, activation="relu")(h)
keras.Model(x, keras.layers.Dense({mlp_out}, name="scores")(h)).save(path)
"""


def convert_tf(settings: dict, work: Path, rss_stage, convert, onnx_size) -> dict:
    """``rss_stage``/``convert``/``onnx_size`` are the large_model section's own helpers."""
    spec = settings.get("large_mlp")
    width, depth = (int(v) for v in spec.split("x")) if spec else (LARGE_WIDTH, LARGE_DEPTH)
    expect = mlp_param_count(width, depth) * 4
    res: dict = {"model": f"Keras MLP {MLP_IN} -> {depth + 1} x {width} -> {MLP_OUT} (.keras file)",
                 "params": mlp_param_count(width, depth)}
    work.mkdir(parents=True, exist_ok=True)
    why = room_for(work, 3 * expect, 4 * expect, ".keras file, ONNX model, staging", "the Keras case")
    if why:
        return {**res, "status": "skipped", "reason": why}
    try:
        src = work / "wide_mlp.keras"
        print(f"   building the {expect / 1e9:.2f} GB Keras MLP", flush=True)
        r = run_child([PY, "-c", BUILD.format(mlp_in=MLP_IN, mlp_out=MLP_OUT), str(width), str(depth), str(src)],
                      timeout=1800)
        if not r.ok:
            return {**res, "status": "error", "reason": f"building the Keras model: exit {r.rc}: {r.tail(400)}"}
        floor = run_child([PY, "-c", "import tensorflow, tf2onnx, keras, onnx, onnxruntime, numpy, "
                                     "retool.converter.core"], timeout=300)
        res["import_floor_rss_bytes"] = floor.maxrss_bytes if floor.ok else None
        out_dir = work / "onnx"
        out_dir.mkdir()
        dst = out_dir / "wide_mlp.onnx"
        print("   converting it with retool (large-model path)", flush=True)
        r, report = convert(str(src), [], dst, timeout=3600)
        if not r.ok:
            lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
            return {**res, "status": "error", "reason": f"retool convert: exit {r.rc}: {(lines or [''])[-1][:400]}"}
        size = onnx_size(dst)
        res["model_size_bytes"] = size
        res["source_size_bytes"] = src.stat().st_size
        res["external_data"] = sorted(p.name for p in out_dir.iterdir() if p != dst and not p.name.endswith(".json"))
        params = ((report or {}).get("artifact") or {}).get("provenance", [{}])[0].get("params", {})
        res["large_model_path"] = bool(params.get("external_data"))
        res["parity_passed"] = bool((report or {}).get("passed"))
        res["stage"] = rss_stage(r, size, res["import_floor_rss_bytes"],
                                 note="Keras source, large-model export, ORT check and parity in one process")
        res["status"] = "ok"
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)
