"""Which node ranking picks better fp32 fallbacks: retool's probe or ORT's qdq_loss_debug SQNR?

    .venv/bin/python bench/rank_compare.py MODEL.onnx 3,32,32      # single float input named x

Prints the time each ranking takes and the output error after keeping its top 1, 2, 4 nodes in fp32.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retool.optimizers import quantize, accuracy
from retool.optimizers.targets import get_target
from retool.optimizers.hardware import adapt, detect
from retool.runtime import make_session, run_session
from onnxruntime.quantization import qdq_loss_debug as qd

src = Path(sys.argv[1]); shape = tuple(int(x) for x in sys.argv[2].split(","))
import tempfile
wd = Path(tempfile.mkdtemp(prefix='rank-' + src.stem + '-'))
rng = np.random.default_rng(3)
calib = [{"x": rng.standard_normal((1, *shape)).astype(np.float32)} for _ in range(16)]
held = [{"x": rng.standard_normal((1, *shape)).astype(np.float32)} for _ in range(16)]
prof, _ = adapt(get_target("cpu-int8"), detect())
pre = wd / "pre.onnx"; quantize.preprocess(src, pre)
cache = wd / "cal.json"; quantize.calibrate(pre, iter(calib), prof, "minmax", cache, wd)
def build(excl, tag):
    out = wd / f"q_{tag}.onnx"; quantize.quantize_static(pre, out, prof, cache, "minmax", excl); return out
q0 = build([], "0")
cands = quantize.quantizable_nodes(pre, prof)
def outs(p, feeds):
    s = make_session(p, threads=1); return [np.concatenate([run_session(s, f)[0] for f in feeds])]
ref = outs(pre, held)
def err(p): return accuracy.output_error(ref, outs(p, held))
feeds4 = calib[:4]
t = time.perf_counter()
probe_rank = accuracy.rank_nodes(pre, q0, feeds4, cands, wd)
t_probe_local = time.perf_counter() - t
# the search also probes the shortlist by its output effect: that is part of retool's ranking
t = time.perf_counter()
refr = outs(pre, feeds4)
probed = []
for n, _ in probe_rank[:accuracy.SHORTLIST]:
    p = build([n], "probe"); probed.append((n, accuracy.output_error(refr, outs(p, feeds4))))
probed.sort(key=lambda x: x[1]); retool_rank = [n for n, _ in probed] + [n for n, _ in probe_rank[accuracy.SHORTLIST:]]
t_probe = t_probe_local + time.perf_counter() - t
# ORT qdq_loss_debug: SQNR of every activation, float vs qdq
t = time.perf_counter()
from onnxruntime.quantization import CalibrationDataReader
class R(CalibrationDataReader):
    def __init__(s, f): s.it = iter(f)
    def get_next(s): return next(s.it, None)
fa, qa = wd / "f_aug.onnx", wd / "q_aug.onnx"
qd.modify_model_output_intermediate_tensors(str(pre), str(fa)); qd.modify_model_output_intermediate_tensors(str(q0), str(qa))
facts = qd.collect_activations(str(fa), R(feeds4)); qacts = qd.collect_activations(str(qa), R(feeds4))
match = qd.create_activation_matching(qacts, facts)
sq = qd.compute_activation_error(match)
m = onnx.load(str(pre)); prod = {o: n.name for n in m.graph.node for o in n.output}
# a node's score: the SQNR of its output (lowest first); inputs of a node share the producer's tensor
node_sq = {}
for tname, e in sq.items():
    n = prod.get(tname)
    if n in cands and "xmodel_err" in e:
        node_sq[n] = min(node_sq.get(n, 1e9), e["xmodel_err"])
sqnr_rank = sorted(node_sq, key=lambda n: node_sq[n])
t_sqnr = time.perf_counter() - t
res = {"model": src.name, "quantizable": len(cands), "seconds": {"retool_probe": round(t_probe, 2), "retool_local_only": round(t_probe_local, 2), "qdq_loss_debug": round(t_sqnr, 2)},
       "error_all_int8": err(q0), "after_excluding": {}}
for k in (1, 2, 4):
    res["after_excluding"][k] = {"retool": err(build(retool_rank[:k], f"r{k}")), "qdq_loss_debug": err(build(sqnr_rank[:k], f"s{k}")),
                                  "retool_nodes": retool_rank[:k], "sqnr_nodes": sqnr_rank[:k]}
print(json.dumps(res, indent=1))
