"""cpu-auto --accuracy "top1>=0.97" on the ResNet-18-like fixture with recalibrated BN (issue 24, item 1).

    .venv/bin/python bench/goal_search.py WORKDIR [HELDOUT=300] [BUDGET=3] [TARGET=cpu-auto] [GOAL] [DATA=white]

fixtures.cnn_anchor's ResNet-18 (BN recalibrated on DATA: white noise as the anchor, natural-like 1/f
images, or classes; ``classes:0.3`` is the classes network fed inputs with noise at 0.3 of the prototype's
amplitude instead of 0.5: wider top-1 margins), inputs of that kind (seed 11), 64 calibration samples,
HELDOUT held out, 1 thread. Prints the goal block, the chosen target and the Pareto front (speed-up over
fp32 with its 95 % CI, top-1 lower bound); the whole report goes to WORKDIR/TARGET.report.json. Record
`uptime` beside the figures.
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

work = Path(sys.argv[1])
work.mkdir(parents=True, exist_ok=True)
heldout = int(sys.argv[2]) if len(sys.argv) > 2 else 300
budget = int(sys.argv[3]) if len(sys.argv) > 3 else 3
target = sys.argv[4] if len(sys.argv) > 4 else "cpu-auto"
goal = sys.argv[5] if len(sys.argv) > 5 else "top1>=0.97"
data = sys.argv[6] if len(sys.argv) > 6 else "white"  # fixtures.cnn_anchor.DATA[:noise for classes]
data, _, noise = data.partition(":")
fp32 = work / "fp32.onnx"
if not fp32.exists():
    from fixtures.cnn_anchor import resnet18
    from retool.converter.core import convert

    m = resnet18(data)
    convert(m, fp32, inputs=m.retool_inputs)
calib = work / "calib.npz"
if not calib.exists():
    from fixtures.cnn_anchor import DATA

    np.savez(calib, x=DATA[data](heldout + 64, 11, (3, 224, 224), **({"noise": float(noise)} if noise else {})))

from retool.errors import ValidationFailed  # noqa: E402
from retool.optimizers.core import optimize  # noqa: E402

print("load before:", os.getloadavg(), flush=True)
t0 = time.time()
try:
    _, rep = optimize(fp32, work / f"{target}.onnx", target=target, calibration=calib, accuracy=goal,
                      threads=1, heldout=heldout, accuracy_budget=budget, calibration_samples=64)
    met = True
except ValidationFailed as exc:
    rep, met = exc.report, False
print("seconds", round(time.time() - t0), "load after:", os.getloadavg(), "met", met)
d = rep.data
(work / f"{target}.report.json").write_text(json.dumps(d, indent=1, default=str))
auto = d.get("auto") or {}
print(json.dumps({"goal": d.get("accuracy_goal"), "chosen": d.get("chosen_target"),
                  "chosen_variant": auto.get("chosen_variant"), "pareto": auto.get("pareto"),
                  "candidates": [{k: r.get(k) for k in ("target", "passed", "probe_error", "searched", "ratio",
                                                         "excluded_nodes", "reason", "precision_bound")
                                  if k in r} for r in auto.get("candidates", [])]},
                 indent=1, default=str))
