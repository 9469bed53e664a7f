"""Parity for DetectionOutput rows: the same detections, matched regardless of order.

Element-wise comparison cannot judge these: the row count varies, runtimes order
equal-score rows differently, and OpenCV pads its output with zero rows up to
keep_top_k per image where Caffe (and retool's ONNX graph) do not. So both sides are
reduced to their real detections (label >= 0, score > 0) and matched one to one:
same image and label, score and box coordinates within ``atol``. A detection whose
score lies within ``atol`` of confidence_threshold may exist on one side only.
"""
from __future__ import annotations

import numpy as np

from retool.types import CheckResult

ATOL = 1e-4


def real_rows(a: np.ndarray) -> np.ndarray:
    rows = np.asarray(a, dtype=np.float64).reshape(-1, 7)
    return rows[(rows[:, 1] >= 0) & (rows[:, 2] > 0)]


def compare_detections(name: str, ref: np.ndarray, cand: np.ndarray, label: str = "", *,
                       threshold: float | None = None, atol: float = ATOL) -> CheckResult:
    r, c = real_rows(ref), real_rows(cand)
    used = np.zeros(len(c), dtype=bool)
    unmatched_ref, box_diffs, score_diffs = [], [], []
    for row in r[np.argsort(-r[:, 2], kind="stable")]:
        same = (~used) & (c[:, 0] == row[0]) & (c[:, 1] == row[1]) if len(c) else np.zeros(0, bool)
        diff = np.abs(c[:, 2:] - row[2:]).max(axis=1) if len(c) else np.zeros(0)
        ok = np.where(same & (diff <= atol))[0]
        if len(ok):
            j = ok[np.argmin(diff[ok])]
            used[j] = True
            box_diffs.append(float(np.abs(c[j, 3:] - row[3:]).max()))
            score_diffs.append(float(abs(c[j, 2] - row[2])))
        else:
            unmatched_ref.append(row)
    unmatched_cand = list(c[~used])

    def borderline(row) -> bool:
        return threshold is not None and abs(row[2] - threshold) <= atol

    excused = [x for x in unmatched_ref + unmatched_cand if borderline(x)]
    bad_ref = [x for x in unmatched_ref if not borderline(x)]
    bad_cand = [x for x in unmatched_cand if not borderline(x)]
    passed = not bad_ref and not bad_cand
    matched = len(box_diffs)
    msg = (f"{matched} detections matched (boxes within {max(box_diffs, default=0.0):.2e})" if passed else
           f"{len(bad_ref)} reference and {len(bad_cand)} candidate detections have no match within {atol}")
    return CheckResult(
        f"parity:{name}" + (f"@{label}" if label else ""), passed, matched, atol, msg,
        {"kind": "detections", "reference_detections": int(len(r)), "candidate_detections": int(len(c)),
         "matched": matched, "max_box_abs": max(box_diffs, default=0.0), "max_score_abs": max(score_diffs, default=0.0),
         "unmatched_reference": [x.tolist() for x in bad_ref[:5]],
         "unmatched_candidate": [x.tolist() for x in bad_cand[:5]],
         "borderline_excused": len(excused)})


def comparators(net, output_tensors) -> dict:
    """DetectionOutput tops among the net's outputs -> their order-insensitive comparison."""
    from functools import partial

    out = {}
    for L in net.layers:
        if L.type == "DetectionOutput" and L.tops[0] in output_tensors:
            p = L.param.detection_output_param
            thr = float(p.confidence_threshold) if p.HasField("confidence_threshold") else None
            out[L.tops[0]] = partial(compare_detections, threshold=thr)
    return out


def head_checks(source, feeds_list, tol) -> list[CheckResult]:
    """Element-wise parity of the raw heads DetectionOutput reads (mbox_loc, mbox_conf, priors).

    The ONNX side is a copy of the converted graph with the heads as extra outputs, run here;
    the reference is the same runtime the outputs are checked against (OpenCV, or the NumPy one).
    """
    import onnx
    import onnxruntime as ort

    from retool.validators.parity import compare_outputs

    heads = list(dict.fromkeys(t for L in source.net.layers if L.type == "DetectionOutput" for t in L.bottoms))
    heads = [t for t in heads if t not in source.output_tensors]
    if not heads:
        return []
    model = onnx.ModelProto()
    model.CopyFrom(source.model)
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in heads)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    if source._reference_problem():
        from retool.converter.caffe.reference_numpy import NumpyReference

        ref = NumpyReference(source.net, heads)
    else:
        from retool.converter.caffe.reference import OpenCVReference

        writer = {t: (L.name, L.tops.index(t)) for L in source.net.layers for t in L.tops}
        ref = OpenCVReference(source.prototxt, source.weights, [writer[t] for t in heads])
    checks = []
    for feeds in feeds_list:
        first = next(iter(feeds.values()))
        label = f"batch{first.shape[0]}" if len(feeds_list) > 1 else ""
        checks += compare_outputs(heads, ref.run(feeds), sess.run(heads, dict(feeds)), tol, label)
    return checks
