"""Numerical parity between a reference's outputs and a candidate's outputs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from retool.types import CheckResult


@dataclass(frozen=True)
class Tolerance:
    """Limits an output must meet. ``None`` disables that limit.

    ``atol``/``rtol`` follow numpy.allclose: |cand - ref| <= atol + rtol * |ref|.
    ``confidence`` (an accuracy goal sets it): ``min_top1`` is judged on the one-sided lower
    confidence bound of the agreement (validators.bounds), ``min_cosine`` on the lowest
    per-row cosine as well as the whole output's.
    """

    atol: float | None = 1e-4
    rtol: float | None = 1e-3
    min_cosine: float | None = 0.9999
    min_top1: float | None = None
    confidence: float | None = None

    def merged(self, **overrides) -> "Tolerance":
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Defaults per precision. Quantized models are judged by agreement, not max error.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3, min_cosine=0.9999, min_top1=None),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2, min_cosine=0.999, min_top1=None),
    "int8": Tolerance(atol=None, rtol=None, min_cosine=0.98, min_top1=0.9),
    "uint8": Tolerance(atol=None, rtol=None, min_cosine=0.98, min_top1=0.9),
    "mixed": Tolerance(atol=None, rtol=None, min_cosine=0.99, min_top1=0.95),
}


def tolerance_for(precision: str) -> Tolerance:
    return DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp32"])


def looks_like_scores(a: np.ndarray) -> bool:
    """Class scores: float, 2-D (batch, classes) with more than one class."""
    return a.dtype.kind == "f" and a.ndim == 2 and a.shape[-1] > 1


def output_stats(ref: np.ndarray, cand: np.ndarray, bins: int = 20) -> dict:
    """Error statistics of one output (all values are plain floats)."""
    r = np.asarray(ref, dtype=np.float64).ravel()
    c = np.asarray(cand, dtype=np.float64).ravel()
    if r.size == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0, "p99_abs": 0.0, "max_rel": 0.0, "cosine": 1.0,
                "allclose_excess": 0.0, "size": 0}
    diff = np.abs(r - c)
    finite = np.isfinite(diff)
    if not finite.all():
        return {"max_abs": float("inf"), "mean_abs": float("inf"), "p99_abs": float("inf"),
                "max_rel": float("inf"), "cosine": float("nan"), "nonfinite": int((~finite).sum()),
                "size": int(r.size)}
    rel = diff / np.maximum(np.abs(r), 1e-6)
    nr, nc = np.linalg.norm(r), np.linalg.norm(c)
    if nr == 0 and nc == 0:
        cos = 1.0
    elif nr == 0 or nc == 0:
        cos = 0.0
    else:
        cos = float(np.dot(r, c) / (nr * nc))
    hist, edges = np.histogram(np.log10(diff + 1e-12), bins=bins, range=(-12, 2))
    return {
        "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
        "p99_abs": float(np.percentile(diff, 99)), "max_rel": float(rel.max()),
        "cosine": cos, "size": int(r.size),
        "histogram": {"log10_abs_error_edges": [float(e) for e in edges], "counts": [int(h) for h in hist]},
    }


def top1_agreement(ref: np.ndarray, cand: np.ndarray) -> float:
    return float(np.mean(np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1)))


def min_row_cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    """The lowest cosine of one row (axis 0: a held-out sample or batch row) with its reference."""
    r = np.asarray(ref, dtype=np.float64).reshape(ref.shape[0], -1)
    c = np.asarray(cand, dtype=np.float64).reshape(cand.shape[0], -1)
    nr, nc = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
    both0, one0 = (nr == 0) & (nc == 0), (nr == 0) ^ (nc == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.sum(r * c, axis=1) / (nr * nc)
    cos = np.where(both0, 1.0, np.where(one0, 0.0, cos))
    return float(np.min(cos))


def _top1_bound(ref, cand, tol: Tolerance, stats: dict) -> list[str]:
    """A goal's top-1: the agreement's lower confidence bound must reach ``min_top1``.
    A goal of 1 (no sample bounds a share at exactly 1) needs every row to agree."""
    from retool.validators import bounds

    n = int(ref.shape[0])
    k = int(np.sum(np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1)))
    lo = bounds.lower_bound(k, n, tol.confidence)
    stats.update(top1_agree=k, top1_rows=n, top1_lower=lo, top1_bound=bounds.describe(tol.confidence))
    if tol.min_top1 is None:
        return []
    if tol.min_top1 >= 1.0:
        return [] if k == n else [f"top-1 agreement {k}/{n} < 1 (a goal of 1 needs every row to agree)"]
    if lo >= tol.min_top1:
        return []
    return [f"top-1 agreement {stats['top1']:.3f} ({k}/{n}; {bounds.describe(tol.confidence)} {lo:.3f}) "
            f"< {tol.min_top1}"]


def compare_output(name: str, ref: np.ndarray, cand: np.ndarray, tol: Tolerance, label: str = "") -> CheckResult:
    """One CheckResult for one output tensor."""
    ref = np.asarray(ref)
    cand = np.asarray(cand)
    check_name = f"parity:{name}" + (f"@{label}" if label else "")
    if ref.shape != cand.shape:
        return CheckResult(check_name, False, None, tol.to_dict(),
                           f"shape differs: reference {ref.shape}, candidate {cand.shape}",
                           {"ref_shape": list(ref.shape), "cand_shape": list(cand.shape)})
    if ref.dtype.kind in "iub" and cand.dtype.kind in "iub":
        mism = int(np.sum(ref != cand))
        return CheckResult(check_name, mism == 0, mism, 0,
                           "" if mism == 0 else f"{mism} of {ref.size} integer values differ",
                           {"mismatches": mism, "size": int(ref.size)})
    stats = output_stats(ref, cand)
    failures = []
    if "nonfinite" in stats:
        failures.append(f"{stats['nonfinite']} non-finite differences")
    else:
        if tol.atol is not None or tol.rtol is not None:
            atol, rtol = tol.atol or 0.0, tol.rtol or 0.0
            r64, c64 = ref.astype(np.float64), cand.astype(np.float64)
            excess = float(np.max(np.abs(r64 - c64) - (atol + rtol * np.abs(r64)))) if ref.size else 0.0
            stats["allclose_excess"] = excess
            if excess > 0:
                failures.append(f"max abs error {stats['max_abs']:.3g} > atol {atol:g} + rtol {rtol:g}*|ref|")
        if tol.confidence is not None and ref.ndim >= 2 and ref.shape[0] > 1:
            stats["cosine_min_row"] = min_row_cosine(ref, cand)
        if tol.min_cosine is not None and stats["cosine"] < tol.min_cosine:
            failures.append(f"cosine {stats['cosine']:.6f} < {tol.min_cosine}")
        elif tol.min_cosine is not None and stats.get("cosine_min_row", 1.0) < tol.min_cosine:
            failures.append(f"lowest per-row cosine {stats['cosine_min_row']:.6f} < {tol.min_cosine} "
                            f"(over {ref.shape[0]} rows)")
        if looks_like_scores(ref) and ref.shape[0] >= 1:
            stats["top1"] = top1_agreement(ref, cand)
            if tol.confidence is not None:
                failures += _top1_bound(ref, cand, tol, stats)
            elif tol.min_top1 is not None and stats["top1"] < tol.min_top1:
                failures.append(f"top-1 agreement {stats['top1']:.3f} < {tol.min_top1}")
    return CheckResult(check_name, not failures, stats.get("max_abs"), tol.to_dict(), "; ".join(failures), stats)


def compare_outputs(names: Sequence[str], ref: Sequence[np.ndarray], cand: Sequence[np.ndarray],
                    tol: Tolerance | Mapping[str, Tolerance], label: str = "") -> list[CheckResult]:
    if len(ref) != len(cand):
        return [CheckResult("parity:outputs" + (f"@{label}" if label else ""), False, len(cand), len(ref),
                            f"candidate has {len(cand)} outputs, reference has {len(ref)}")]
    out = []
    for name, r, c in zip(names, ref, cand):
        t = tol.get(name, tol.get("*", Tolerance())) if isinstance(tol, Mapping) else tol
        out.append(compare_output(name, r, c, t, label))
    return out
