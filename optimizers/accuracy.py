"""Accuracy-aware fallback: find the nodes that cost the most accuracy, keep them in float, retry.

The float model and the candidate are both run with every intermediate tensor
exposed. A node's cost is how much the relative error of its output exceeds
the worst error of its inputs: the error that node itself introduced (its
quantized inputs, weights and arithmetic), not the error it inherited.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from retool import console

#: Retries after the first attempt; each keeps twice as many more nodes in float.
DEFAULT_BUDGET = 4


@dataclass
class SearchResult:
    path: Path
    passed: bool
    checks: list
    excluded: list[str] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)


#: Nodes from the local ranking whose real effect on the outputs is probed per retry.
SHORTLIST = 6


def search(build: Callable[[Sequence[str], object], Path], evaluate: Callable[[Path], tuple[bool, list]],
           rank: Callable[[Path, Sequence[str]], list[tuple[str, float]]], budget: int = DEFAULT_BUDGET,
           label: str = "", impact: Callable[[Path], float] | None = None,
           timing: Callable[[Path], dict] | None = None,
           floor: Callable[[dict], str | None] | None = None) -> SearchResult:
    """Build, evaluate; while it fails and the budget lasts, exclude the costliest nodes and rebuild.

    The local ranking is cheap but blind to what happens downstream (a pooling layer
    averages noise away), so the top of it is probed: each shortlisted node is kept
    in float on its own and the error left at the outputs (``impact``) decides.
    ``timing`` (an accuracy goal is set): each attempt's latency against fp32, so the report
    says what every group kept in fp32 costs. ``floor`` (given a timed attempt): why more float
    nodes are not worth trying (the step is decidedly slower than the goal's speed floor), or None.
    """
    excluded: list[str] = []
    path = build(excluded, 0)
    passed, checks = evaluate(path)
    attempts = [_attempt(0, excluded, [], passed, checks)]
    _timed(attempts, timing, path)
    step = 1
    for attempt in range(1, budget + 1):
        if passed or _stopped(attempts, floor, label):
            break
        ranked = [(n, s) for n, s in rank(path, excluded) if n not in excluded]
        if not ranked:
            break
        if impact is not None and len(ranked) > 1:
            short = ranked[:max(step, SHORTLIST)]
            probed = []
            for j, (n, _) in enumerate(short):
                p = build(excluded + [n], f"{attempt}-probe{j}")
                probed.append((n, impact(p)))
                _remove_onnx(p)
            probed.sort(key=lambda x: x[1])
            ranked = probed + ranked[len(short):]
        new = ranked[:step]
        excluded = excluded + [n for n, _ in new]
        step *= 2
        console.info(f"  {label}tolerance not met; keeping {len(excluded)} node(s) in float "
                     f"({len(new)} new): {', '.join(excluded)}")
        path = build(excluded, attempt)
        passed, checks = evaluate(path)
        attempts.append(_attempt(attempt, excluded, new, passed, checks))
        _timed(attempts, timing, path)
    if not passed:
        _stopped(attempts, floor, label)
    return SearchResult(path, passed, checks, excluded, attempts)


def _stopped(attempts: list[dict], floor, label: str) -> bool:
    if floor is None or "stopped" in attempts[-1]:
        return "stopped" in attempts[-1]
    # plain int8 already below the floor (a small model): the floor says nothing about keeping more in
    # float, and the goal's accuracy still decides
    if len(attempts) < 2 or floor(attempts[0]):
        return False
    why = floor(attempts[-1])
    if why:
        attempts[-1]["stopped"] = why
        console.info(f"  {label}{why}; no more nodes kept in float")
    return bool(why)


def _timed(attempts: list[dict], timing, path) -> None:
    """Latency of the last attempt, and what its newly kept-float nodes cost over the one before."""
    if timing is None:
        return
    try:
        t = timing(path)
    except Exception as exc:  # timing is information; the parity gate still decides
        attempts[-1]["latency"] = {"error": str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}
        return
    attempts[-1]["latency"] = t
    prev = attempts[-2].get("latency", {}) if len(attempts) > 1 else {}
    if "p50_ms" in prev and "p50_ms" in t:
        attempts[-1]["cost_ms"] = round(t["p50_ms"] - prev["p50_ms"], 4)


def _remove_onnx(path: Path) -> None:
    from retool.fsutil import external_data_files

    for name in external_data_files(path):
        (path.parent / name).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def output_error(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """Relative L2 error over all float outputs together."""
    num = den = 0.0
    for r, c in zip(reference, outputs):
        if r.dtype.kind != "f" or r.shape != c.shape:
            continue
        num += float(np.sum((r.astype(np.float64) - c.astype(np.float64)) ** 2))
        den += float(np.sum(r.astype(np.float64) ** 2))
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def _attempt(i, excluded, new, passed, checks) -> dict:
    worst = {}
    for c in checks:
        d = c.details or {}
        for k in ("cosine", "cosine_min_row", "top1", "top1_lower", "max_abs"):
            if k in d and isinstance(d[k], (int, float)):
                worst[k] = min(worst.get(k, d[k]), d[k]) if k != "max_abs" else max(worst.get(k, d[k]), d[k])
    return {"attempt": i, "excluded": list(excluded), "added": [{"node": n, "score": round(float(s), 6)} for n, s in new],
            "passed": bool(passed), **worst}


def rank_nodes(reference, candidate, feeds_list: Sequence[Mapping[str, np.ndarray]],
               candidates: Sequence[str], workdir, touched_only: bool = True) -> list[tuple[str, float]]:
    """``candidates`` (node names of ``reference``) ordered by the error each introduces, costliest first."""
    import onnx

    ref = onnx.load(str(reference), load_external_data=False)
    cand = onnx.load(str(candidate), load_external_data=False)
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    vi = {v.name: v.type.tensor_type.elem_type for v in list(ref.graph.value_info) + list(ref.graph.output)}
    # Compare each float tensor with what the candidate's consumers see: its dequantized
    # value when the quantizer put a Q/DQ pair after it (that is also where a dropped
    # Relu's clipping happens), else the tensor itself when the same kind of op makes it.
    cand_op = {o: n.op_type for n in cand.graph.node for o in n.output}
    pairs = {}
    for n in ref.graph.node:
        for t in n.output:
            if not t or vi.get(t) not in float_types:
                continue
            if cand_op.get(t + "_DequantizeLinear_Output") == "DequantizeLinear":
                pairs[t] = t + "_DequantizeLinear_Output"
            elif t in cand_op and (cand_op[t] == n.op_type or n.op_type not in _ACTIVATIONS):
                pairs[t] = t
    if not pairs:
        return []
    ref_vals = _run_with_outputs(ref, reference, list(pairs), feeds_list, workdir, "ref")
    cand_vals = _run_with_outputs(cand, candidate, list(pairs.values()), feeds_list, workdir, "cand")
    err = {t: _rel_err(ref_vals[t], cand_vals[c]) for t, c in pairs.items() if t in ref_vals and c in cand_vals}

    producer = {o: n for n in ref.graph.node for o in n.output}
    memo: dict[str, float] = {}

    def inherited(t: str, depth: int = 0) -> float:
        """The error a tensor carries: measured, or the worst of its producer's inputs."""
        if t in err:
            return err[t]
        if t in memo:
            return memo[t]
        n = producer.get(t)
        memo[t] = 0.0 if n is None or depth > 50 else max([inherited(i, depth + 1) for i in n.input if i] or [0.0])
        return memo[t]

    if touched_only:
        candidates = touched_nodes(ref, cand, candidates)
    by_name = {n.name: n for n in ref.graph.node}
    consumers: dict[str, list] = {}
    for n in ref.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def effective_output(n) -> str | None:
        """Where n's own error shows: its output, or that of the activation fused after it."""
        t = n.output[0] if n.output else None
        if t in err:
            return t
        nxt = consumers.get(t, [])
        if len(nxt) == 1 and nxt[0].op_type in _ACTIVATIONS and nxt[0].output and nxt[0].output[0] in err:
            return nxt[0].output[0]
        return None

    scores = []
    for name in candidates:
        n = by_name.get(name)
        out = effective_output(n) if n is not None else None
        if out is None:
            continue
        before = max([inherited(i) for i in n.input if i] or [0.0])
        scores.append((name, err[out] - before, n.op_type in _WEIGHTED))
    # Ties (a Conv and the Relu fused into it) go to the op that carries weights.
    scores.sort(key=lambda x: (-round(x[1], 9), not x[2]))
    return [(name, cost) for name, cost, _ in scores]


_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu"}
_WEIGHTED = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "LSTM", "GRU", "Gather", "EmbedLayerNormalization"}
def touched_nodes(ref, cand, candidates: Sequence[str]) -> list[str]:
    """Candidates the quantizer really changed: replaced (QOperator) or fed by a DequantizeLinear (QDQ)."""
    ref_ops = {n.name: n.op_type for n in ref.graph.node}
    cand_nodes = {n.name: n for n in cand.graph.node}
    dq_out = {o for n in cand.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    out = []
    for name in candidates:
        n = cand_nodes.get(name)
        if n is None or n.op_type != ref_ops.get(name) or any(i in dq_out for i in n.input):
            out.append(name)
    return out


def _run_with_outputs(model, path, tensors, feeds_list, workdir, tag) -> dict[str, np.ndarray]:
    import onnx

    from retool.runtime import make_session, run_session

    try:  # declared types for the probes: a wrong one (fp32 for an fp16 tensor) crashes ORT
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:
        pass
    g = model.graph
    have = {o.name for o in g.output}
    vi = {v.name: v.type.tensor_type.elem_type for v in g.value_info}
    for t in tensors:
        if t not in have and vi.get(t):
            g.output.append(onnx.helper.make_tensor_value_info(t, vi[t], None))
    # Saved beside the model so that relative external-data paths still resolve.
    aug = Path(path).with_name(f".{Path(path).stem}.{tag}-probe.onnx")
    onnx.save(model, str(aug))
    try:
        sess = make_session(aug, threads=None, level="basic")
        names = [o.name for o in sess.get_outputs()]
        acc: dict[str, list] = {}
        for feeds in feeds_list:
            for name, val in zip(names, run_session(sess, feeds)):
                if name in tensors:
                    acc.setdefault(name, []).append(np.asarray(val, dtype=np.float32).ravel())
        del sess
    finally:
        aug.unlink(missing_ok=True)
    return {k: np.concatenate(v) for k, v in acc.items()}


def _rel_err(r: np.ndarray, c: np.ndarray) -> float:
    if r.shape != c.shape:
        return 0.0
    d = np.linalg.norm(r.astype(np.float64) - c.astype(np.float64))
    n = np.linalg.norm(r.astype(np.float64))
    if not np.isfinite(d):
        return 1e6
    return float(d / n) if n > 0 else float(d)


def source_layers(model_path, nodes: Sequence[str]) -> dict[str, str]:
    """Best guess at the source-framework layer of each node, from exporter metadata or the node name."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    by_name = {n.name: n for n in m.graph.node}
    out = {}
    for name in nodes:
        n = by_name.get(name)
        layer = None
        if n is not None:
            meta = {p.key: p.value for p in n.metadata_props}
            scopes = meta.get("pkg.torch.onnx.name_scopes")
            if scopes:  # torch dynamo: ['', 'features', 'features.1', 'conv2d'] -> features.1
                try:
                    parts = [s for s in ast.literal_eval(scopes) if s]
                    layer = parts[-2] if len(parts) >= 2 else (parts[0] if parts else None)
                except (ValueError, SyntaxError):
                    layer = None
            if layer is None and "namespace" in meta:
                layer = meta["namespace"].split(":")[-1].strip() or None
        if layer is None and "/" in name:  # tf2onnx / torchscript: scope/scope/op
            layer = name.rsplit("/", 1)[0].lstrip("/")
        out[name] = layer or name
    return out
