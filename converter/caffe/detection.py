"""SSD's DetectionOutput, lowered to standard ONNX ops (TopK, NonMaxSuppression, Gather ...).

Caffe SSD (DetectionOutputLayer::Forward_cpu), per image:
  1. decode every prior's box from mbox_loc with the prior and its variances (code_type);
  2. per class but the background: keep the ``top_k`` best scores above
     ``confidence_threshold``, then greedy NMS (IoU > ``nms_threshold`` suppresses);
  3. if more than ``keep_top_k`` boxes remain over all classes, keep the best ``keep_top_k``;
  4. write rows [image, label, score, xmin, ymin, xmax, ymax], by image, then label, then score.
The output is [1, 1, N, 7] with N dynamic (the ONNX dim ``detections``); with no detection at
all Caffe writes one row [i, -1, -1, -1, -1, -1, -1] per image, and so does this graph.

Pre-NMS ``top_k`` is a TopK per (image, class); each (image, class) pair is then its own
NonMaxSuppression batch item, so the per-class candidate lists stay Caffe's.
"""
from __future__ import annotations

import numpy as np

from retool.converter.caffe.builder import Builder, handles
from retool.converter.caffe.reader import Layer
from retool.errors import ConversionError

CODE_TYPES = {1: "CORNER", 2: "CENTER_SIZE", 3: "CORNER_SIZE"}
#: the dim_param of the varying number of detection rows
DETECTIONS_DIM = "detections"


def _err(L: Layer, what: str) -> ConversionError:
    return ConversionError(f"layer {L.name!r} (DetectionOutput): {what}")


def params(L: Layer) -> dict:
    """The layer's settings, checked; shared by the lowering and the NumPy reference."""
    p = L.param.detection_output_param
    if len(L.bottoms) < 3:
        raise _err(L, f"needs three bottoms (mbox_loc, mbox_conf, mbox_priorbox), got {len(L.bottoms)}")
    if len(L.bottoms) > 3:
        raise _err(L, "a fourth bottom (RefineDet's arm_conf) is not supported")
    if not p.HasField("num_classes") or p.num_classes < 1:
        raise _err(L, "detection_output_param.num_classes is required")
    if not p.share_location:
        raise _err(L, "share_location: false (one box per class) is not supported; MobileNet-SSD and VGG-SSD "
                      "share locations")
    if p.nms_param.eta != 1.0:
        raise _err(L, f"adaptive NMS (eta {p.nms_param.eta}) is not supported; use eta: 1")
    return {"num_classes": int(p.num_classes), "background": int(p.background_label_id),
            "code_type": CODE_TYPES.get(int(p.code_type), str(p.code_type)),
            "variance_encoded": bool(p.variance_encoded_in_target),
            "keep_top_k": int(p.keep_top_k),
            "confidence": float(p.confidence_threshold) if p.HasField("confidence_threshold") else None,
            "nms": float(p.nms_param.nms_threshold),
            "top_k": int(p.nms_param.top_k) if p.nms_param.HasField("top_k") else -1}


def _slice(b: Builder, x: str, start: int, end: int, axis: int, hint: str) -> str:
    return b.op("Slice", [x, b.ints(f"{hint}_s", [start]), b.ints(f"{hint}_e", [end]), b.ints(f"{hint}_a", [axis])],
                hint=hint)


def _scalar(b: Builder, hint: str, value, dtype=np.int64) -> str:
    """A 0-d initializer (Builder.const makes everything at least 1-D; Range and Gather need scalars)."""
    from onnx import numpy_helper

    name = b.fresh(hint)
    b.initializers.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
    return name


def _decode(b: Builder, L: Layer, loc: str, prior: str, cfg: dict) -> str:
    """(N, P, 4) boxes [xmin, ymin, xmax, ymax] from loc (N, P, 4) and the prior blob (1, 2, P*4)."""
    n = L.name
    pv = b.op("Reshape", [prior, b.ints(f"{n}_pv_shape", [2, -1, 4])], hint=f"{n}_prior")
    pbox = b.op("Gather", [pv, _scalar(b, f"{n}_i0", 0)], hint=f"{n}_pbox", axis=0)  # (P, 4)
    var = None if cfg["variance_encoded"] else b.op("Gather", [pv, _scalar(b, f"{n}_i1", 1)], hint=f"{n}_var",
                                                       axis=0)
    code = cfg["code_type"]
    if code == "CORNER":
        delta = loc if var is None else b.op("Mul", [loc, var], hint=f"{n}_vloc")
        return b.op("Add", [pbox, delta], hint=f"{n}_boxes")
    p1, p2 = _slice(b, pbox, 0, 2, 1, f"{n}_p1"), _slice(b, pbox, 2, 4, 1, f"{n}_p2")
    pwh = b.op("Sub", [p2, p1], hint=f"{n}_pwh")
    if code == "CORNER_SIZE":
        scale = b.op("Concat", [pwh, pwh], hint=f"{n}_pwhwh", axis=1)
        delta = b.op("Mul", [loc, scale], hint=f"{n}_sloc")
        if var is not None:
            delta = b.op("Mul", [delta, var], hint=f"{n}_vloc")
        return b.op("Add", [pbox, delta], hint=f"{n}_boxes")
    if code != "CENTER_SIZE":
        raise _err(L, f"unknown code_type {code}")
    half = b.const(f"{n}_half", np.array(0.5, np.float32))
    pc = b.op("Mul", [b.op("Add", [p1, p2], hint=f"{n}_psum"), half], hint=f"{n}_pc")
    lxy, lwh = _slice(b, loc, 0, 2, 2, f"{n}_lxy"), _slice(b, loc, 2, 4, 2, f"{n}_lwh")
    if var is not None:
        lxy = b.op("Mul", [lxy, _slice(b, var, 0, 2, 1, f"{n}_vxy")], hint=f"{n}_vlxy")
        lwh = b.op("Mul", [lwh, _slice(b, var, 2, 4, 1, f"{n}_vwh")], hint=f"{n}_vlwh")
    c = b.op("Add", [b.op("Mul", [lxy, pwh], hint=f"{n}_cd"), pc], hint=f"{n}_c")
    wh = b.op("Mul", [b.op("Exp", [lwh], hint=f"{n}_ewh"), pwh], hint=f"{n}_wh")
    hwh = b.op("Mul", [wh, half], hint=f"{n}_hwh")
    return b.op("Concat", [b.op("Sub", [c, hwh], hint=f"{n}_xy1"), b.op("Add", [c, hwh], hint=f"{n}_xy2")],
                hint=f"{n}_boxes", axis=2)


def _length(b: Builder, x: str, hint: str) -> tuple[str, str]:
    """(the length of 1-D ``x`` as a [1] tensor, and as a scalar)."""
    shp = b.op("Shape", [x], hint=f"{hint}_len")
    return shp, b.op("Squeeze", [shp, b.ints(f"{hint}_sq", [0])], hint=f"{hint}_lens")


def _sort_desc(b: Builder, key: str, hint: str) -> str:
    """Indices that sort 1-D ``key`` in descending order."""
    k, _ = _length(b, key, hint)
    _, idx = b.op("TopK", [key, k], [b.fresh(f"{hint}_v"), b.fresh(f"{hint}_i")], hint=hint, axis=0, largest=1,
                  sorted=1)
    return idx


def _take(b: Builder, tensors: dict, idx: str, hint: str) -> dict:
    return {k: b.op("Gather", [v, idx], hint=f"{hint}_{k}", axis=0) for k, v in tensors.items()}


@handles("DetectionOutput")
def detection_output(b: Builder, L: Layer) -> None:
    cfg = params(L)
    n, C = L.name, cfg["num_classes"]
    loc_in, conf_in, prior_in = L.bottoms
    P = b.shape(prior_in)[-1] // 4
    if b.shape(prior_in)[-2] != 2 or int(np.prod(b.shape(prior_in))) != 2 * P * 4:
        raise _err(L, f"the prior bottom {prior_in!r} has shape {b.shape(prior_in)}, expected (1, 2, P*4)")
    if int(np.prod(b.shape(loc_in)[1:])) != P * 4:
        raise _err(L, f"mbox_loc {loc_in!r} has {int(np.prod(b.shape(loc_in)[1:]))} values per image; "
                      f"{P} priors need {P * 4}")
    if int(np.prod(b.shape(conf_in)[1:])) != P * C:
        raise _err(L, f"mbox_conf {conf_in!r} has {int(np.prod(b.shape(conf_in)[1:]))} values per image; "
                      f"{P} priors x {C} classes need {P * C}")
    classes = [c for c in range(C) if c != cfg["background"]]
    Cf, K = len(classes), (min(cfg["top_k"], P) if cfg["top_k"] >= 0 else P)

    loc = b.op("Reshape", [loc_in, b.ints(f"{n}_loc_shape", [0, P, 4])], hint=f"{n}_loc")
    boxes = _decode(b, L, loc, prior_in, cfg)  # (N, P, 4)
    conf = b.op("Transpose", [b.op("Reshape", [conf_in, b.ints(f"{n}_conf_shape", [0, P, C])], hint=f"{n}_conf")],
                hint=f"{n}_conf_t", perm=[0, 2, 1])  # (N, C, P)
    cls = b.ints(f"{n}_classes", classes)
    scores = b.op("Gather", [conf, cls], hint=f"{n}_fg", axis=1)  # (N, C', P)
    vals, idx = b.op("TopK", [scores, b.ints(f"{n}_topk", [K])], [b.fresh(f"{n}_topv"), b.fresh(f"{n}_topi")],
                     hint=f"{n}_topk", axis=2, largest=1, sorted=1)  # (N, C', K): Caffe's pre-NMS top_k
    batch = b.op("Gather", [b.op("Shape", [loc_in], hint=f"{n}_shape"), _scalar(b, f"{n}_i0b", 0)], hint=f"{n}_n")
    zero, one = _scalar(b, f"{n}_zero", 0), _scalar(b, f"{n}_one", 1)
    img_off = b.op("Mul", [b.op("Range", [zero, batch, one], hint=f"{n}_imgs"), _scalar(b, f"{n}_P", P)],
                   hint=f"{n}_imgoff")
    flat_prior = b.op("Add", [idx, b.op("Unsqueeze", [img_off, b.ints(f"{n}_ax12", [1, 2])], hint=f"{n}_off3")],
                      hint=f"{n}_fprior")  # (N, C', K) rows of boxes flattened to (N*P, 4)
    boxes_flat = b.op("Reshape", [boxes, b.ints(f"{n}_bflat", [-1, 4])], hint=f"{n}_bflat")
    cand = b.op("Gather", [boxes_flat, b.op("Reshape", [flat_prior, b.ints(f"{n}_m1", [-1])], hint=f"{n}_fp1")],
                hint=f"{n}_cand", axis=0)  # (N*C'*K, 4)
    # Caffe gives a box with xmax < xmin (or ymax < ymin) size 0, so IoU 0 with any box; onnxruntime would
    # reorder its corners. A zero-area box is what it never suppresses with, so flipped boxes become one.
    lo, hi = _slice(b, cand, 0, 2, 1, f"{n}_lo"), _slice(b, cand, 2, 4, 1, f"{n}_hi")
    flipped = b.reduce("ReduceMax", b.op("Cast", [b.op("Less", [hi, lo], hint=f"{n}_flip")], hint=f"{n}_flipf", to=1),
                       [1], f"{n}_flipany", 1)
    nms_box = b.op("Where", [b.op("Cast", [flipped], hint=f"{n}_flipb", to=9),
                             b.op("Concat", [lo, lo], hint=f"{n}_point", axis=1), cand], hint=f"{n}_nmsb")
    nms_in = [b.op("Reshape", [nms_box, b.ints(f"{n}_nbox", [-1, K, 4])], hint=f"{n}_nmsbox"),
              b.op("Reshape", [vals, b.ints(f"{n}_nscore", [-1, 1, K])], hint=f"{n}_nmsscore"),
              b.ints(f"{n}_maxout", [K]), b.const(f"{n}_iou", np.array([cfg["nms"]], np.float32))]
    if cfg["confidence"] is not None:
        nms_in.append(b.const(f"{n}_thr", np.array([cfg["confidence"]], np.float32)))
    sel = b.op("NonMaxSuppression", nms_in, hint=f"{n}_nms", center_point_box=0)  # (S, 3): [n*C'+c, 0, k]
    item = b.op("Squeeze", [_slice(b, sel, 0, 1, 1, f"{n}_sb"), b.ints(f"{n}_sq1", [1])], hint=f"{n}_item")
    kk = b.op("Squeeze", [_slice(b, sel, 2, 3, 1, f"{n}_sk"), b.ints(f"{n}_sq2", [1])], hint=f"{n}_k")
    cf = _scalar(b, f"{n}_Cf", Cf)
    flat_k = b.op("Add", [b.op("Mul", [item, _scalar(b, f"{n}_K", K)], hint=f"{n}_ik"), kk], hint=f"{n}_flatk")
    det = {"image": b.op("Div", [item, cf], hint=f"{n}_img"),
           "label": b.op("Gather", [cls, b.op("Mod", [item, cf], hint=f"{n}_ci")], hint=f"{n}_label", axis=0),
           "score": b.op("Gather", [b.op("Reshape", [vals, b.ints(f"{n}_m1v", [-1])], hint=f"{n}_fv"), flat_k],
                         hint=f"{n}_score", axis=0),
           "box": b.op("Gather", [cand, flat_k], hint=f"{n}_box", axis=0)}
    # sort keys in double: image (and label) dominate, the score breaks ties within them
    score64 = b.op("Cast", [det["score"]], hint=f"{n}_s64", to=11)
    big = b.op("Add", [b.op("Mul", [b.reduce("ReduceMax", b.op("Concat", [b.op("Abs", [score64], hint=f"{n}_abs"),
                                                                         b.const(f"{n}_z1", np.zeros(1), np.float64)],
                                                                 hint=f"{n}_absz", axis=0), [0], f"{n}_max", 0),
                                    b.const(f"{n}_two", np.array(2.0), np.float64)], hint=f"{n}_2m"),
                   b.const(f"{n}_onef", np.array(1.0), np.float64)], hint=f"{n}_big")

    def key(major: str, score: str, hint: str) -> str:
        m = b.op("Mul", [b.op("Cast", [major], hint=f"{hint}_c", to=11), big], hint=f"{hint}_m")
        return b.op("Sub", [b.op("Cast", [score], hint=f"{hint}_s", to=11), m], hint=hint)

    if cfg["keep_top_k"] > -1:  # rank within the image, by score
        order = _sort_desc(b, key(det["image"], det["score"], f"{n}_key1"), f"{n}_ord1")
        img_sorted = b.op("Gather", [det["image"], order], hint=f"{n}_imgs1", axis=0)
        hits = b.op("Cast", [b.op("Equal", [b.op("Unsqueeze", [img_sorted, b.ints(f"{n}_ax1", [1])], hint=f"{n}_u"),
                                              b.op("Range", [zero, batch, one], hint=f"{n}_imgs2")], hint=f"{n}_eq")],
                    hint=f"{n}_hits", to=7)  # (S, N)
        counts = b.op("ReduceSum", [hits, b.ints(f"{n}_ax0s", [0])], hint=f"{n}_counts", keepdims=0)
        first = b.op("CumSum", [counts, _scalar(b, f"{n}_ax0", 0)], hint=f"{n}_first", exclusive=1)
        _, s_len = _length(b, img_sorted, f"{n}_s")
        rank = b.op("Sub", [b.op("Range", [zero, s_len, one], hint=f"{n}_pos"),
                            b.op("Gather", [first, img_sorted], hint=f"{n}_start", axis=0)], hint=f"{n}_rank")
        keep = b.op("Less", [rank, _scalar(b, f"{n}_keep", cfg["keep_top_k"])], hint=f"{n}_keepm")
        det = _take(b, det, b.op("Compress", [order, keep], hint=f"{n}_kept", axis=0), f"{n}_k")
    major = b.op("Add", [b.op("Mul", [det["image"], _scalar(b, f"{n}_C", C)], hint=f"{n}_ic"), det["label"]],
                 hint=f"{n}_major")
    det = _take(b, det, _sort_desc(b, key(major, det["score"], f"{n}_key2"), f"{n}_ord2"), f"{n}_o")
    f32 = {k: b.op("Unsqueeze", [b.op("Cast", [det[k]], hint=f"{n}_{k}f", to=1), b.ints(f"{n}_{k}ax", [1])],
                   hint=f"{n}_{k}u") for k in ("image", "label")}
    rows = b.op("Concat", [f32["image"], f32["label"],
                           b.op("Unsqueeze", [det["score"], b.ints(f"{n}_sax", [1])], hint=f"{n}_su"), det["box"]],
                hint=f"{n}_rows", axis=1)  # (S, 7)
    # Caffe's rows when nothing is detected: [i, -1, -1, -1, -1, -1, -1] for every image i
    _, count = _length(b, det["score"], f"{n}_cnt")
    empty = b.op("Cast", [b.op("Equal", [count, zero], hint=f"{n}_none")], hint=f"{n}_nonei", to=7)
    fakes = b.op("Mul", [batch, empty], hint=f"{n}_nfake")
    fake_img = b.op("Unsqueeze", [b.op("Cast", [b.op("Range", [zero, fakes, one], hint=f"{n}_fr")], hint=f"{n}_frf",
                                       to=1), b.ints(f"{n}_fax", [1])], hint=f"{n}_fimg")
    fake_shape = b.op("Concat", [b.op("Unsqueeze", [fakes, b.ints(f"{n}_fax2", [0])], hint=f"{n}_fu"),
                                 b.ints(f"{n}_six", [6])], hint=f"{n}_fshape", axis=0)
    fake = b.op("Concat", [fake_img, b.op("Expand", [b.const(f"{n}_m1c", np.full((1, 6), -1.0, np.float32)),
                                                      fake_shape], hint=f"{n}_frest")], hint=f"{n}_fake", axis=1)
    all_rows = b.op("Concat", [rows, fake], hint=f"{n}_all", axis=0)
    b.op("Reshape", [all_rows, b.ints(f"{n}_out_shape", [1, 1, -1, 7])], L.tops[0], hint=n)
    b.set(L.tops[0], (1, 1, -1, 7), batched=False)


# -- the NumPy reference, written from Caffe SSD's bbox_util.cpp (not from the lowering above) -----------

def _decode_np(prior: np.ndarray, var: np.ndarray, loc: np.ndarray, cfg: dict) -> np.ndarray:
    v = np.ones_like(var) if cfg["variance_encoded"] else var
    code = cfg["code_type"]
    if code == "CORNER":
        return prior + v * loc
    pw, ph = prior[:, 2] - prior[:, 0], prior[:, 3] - prior[:, 1]
    if code == "CORNER_SIZE":
        return prior + v * loc * np.stack([pw, ph, pw, ph], axis=1)
    cx, cy = (prior[:, 0] + prior[:, 2]) / 2, (prior[:, 1] + prior[:, 3]) / 2
    dcx, dcy = v[:, 0] * loc[:, 0] * pw + cx, v[:, 1] * loc[:, 1] * ph + cy
    dw, dh = np.exp(v[:, 2] * loc[:, 2]) * pw, np.exp(v[:, 3] * loc[:, 3]) * ph
    return np.stack([dcx - dw / 2, dcy - dh / 2, dcx + dw / 2, dcy + dh / 2], axis=1)


def _size(bx) -> float:
    return 0.0 if bx[2] < bx[0] or bx[3] < bx[1] else (bx[2] - bx[0]) * (bx[3] - bx[1])


def _jaccard(a, c) -> float:
    if c[0] > a[2] or c[2] < a[0] or c[1] > a[3] or c[3] < a[1]:
        return 0.0
    inter = _size((max(a[0], c[0]), max(a[1], c[1]), min(a[2], c[2]), min(a[3], c[3])))
    union = _size(a) + _size(c) - inter
    return inter / union if union > 0 else 0.0


def _nms(boxes, scores, cfg) -> list[int]:
    thr = cfg["confidence"]
    cand = [i for i in range(len(scores)) if thr is None or scores[i] > thr]
    cand.sort(key=lambda i: -scores[i])  # stable, as std::stable_sort in GetMaxScoreIndex
    if cfg["top_k"] > -1:
        cand = cand[:cfg["top_k"]]
    kept: list[int] = []
    for i in cand:
        if all(_jaccard(boxes[i], boxes[j]) <= cfg["nms"] for j in kept):
            kept.append(i)
    return kept


def forward_numpy(L: Layer, ins: list[np.ndarray]) -> np.ndarray:
    """DetectionOutputLayer::Forward_cpu: [1, 1, N, 7] rows by image, label, score."""
    cfg = params(L)
    C = cfg["num_classes"]
    loc, conf, prior = ins
    num = loc.shape[0]
    pv = prior.reshape(2, -1, 4)
    P = pv.shape[1]
    rows = []
    for i in range(num):
        boxes = _decode_np(pv[0], pv[1], loc[i].reshape(P, 4), cfg)
        scores = conf[i].reshape(P, C)
        per_label = {c: _nms(boxes, scores[:, c], cfg) for c in range(C) if c != cfg["background"]}
        total = sum(len(v) for v in per_label.values())
        if -1 < cfg["keep_top_k"] < total:
            pairs = sorted(((scores[j, c], c, j) for c, js in per_label.items() for j in js), key=lambda t: -t[0])
            per_label = {}
            for _, c, j in pairs[:cfg["keep_top_k"]]:
                per_label.setdefault(c, []).append(j)
        for c in sorted(per_label):
            rows += [[i, c, scores[j, c], *boxes[j]] for j in per_label[c]]
    if not rows:
        rows = [[i, -1, -1, -1, -1, -1, -1] for i in range(num)]
    return np.asarray(rows, dtype=np.float64).reshape(1, 1, -1, 7)
