"""Build the bundled example models into examples/models/ (seeded, small, not committed).

- PyTorch: no file needed; the pipeline points at the factory ``fixtures.torch_models:cnn``.
- Keras: a Sequential CNN saved as ``keras_cnn.keras``.
- Caffe: a deploy prototxt plus a synthetic ``.caffemodel`` with random weights.
Each gets a small calibration set (``*_calib.npz``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"
sys.path.insert(0, str(ROOT))


def build(out: Path = MODELS) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    made = {}
    np.savez(out / "torch_cnn_calib.npz", x=rng.standard_normal((16, 3, 32, 32)).astype(np.float32))
    made["torch_calib"] = out / "torch_cnn_calib.npz"

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keras_path = out / "keras_cnn.keras"
    if not keras_path.exists():
        # TF's C++ start-up lines (oneDNN, cudart) ignore TF_CPP_MIN_LOG_LEVEL: import TF the way
        # retool does (stderr hidden, replayed on failure), and build with stderr hidden the same way
        from retool.converter.tf_export import _stderr_to_file, import_tf

        import_tf()
        from fixtures import tf_models

        with _stderr_to_file():
            tf_models.save_keras(tf_models.sequential_cnn(), keras_path)
    np.savez(out / "keras_cnn_calib.npz", image=rng.standard_normal((16, 32, 32, 3)).astype(np.float32))
    made["keras"] = keras_path

    import shutil

    from fixtures import caffe_nets

    proto = out / "caffe_net.prototxt"
    shutil.copyfile(ROOT / "examples" / "caffe_net.prototxt", proto)
    weights = caffe_nets.write_caffemodel(proto, out / "caffe_net.caffemodel", seed=0)
    np.savez(out / "caffe_net_calib.npz", data=rng.standard_normal((16, 3, 32, 32)).astype(np.float32))
    made["caffe"] = proto
    made["caffe_weights"] = weights
    return made


if __name__ == "__main__":
    for k, v in build().items():
        print(f"{k}: {v}")
