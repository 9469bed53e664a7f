"""The regression gate: a new version may not be slower, bigger or less faithful than what is published.

Metrics are read defensively from the reports that stages write; a metric missing on
either side is not compared, and the check says so (severity "info").
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from retool.errors import UsageError
from retool.types import CheckResult


@dataclass(frozen=True)
class Thresholds:
    latency_pct: float | None = 20.0  # latency may grow by at most this many percent
    size_pct: float | None = 10.0  # size may grow by at most this many percent
    cosine_drop: float | None = 0.01  # min cosine may fall by at most this much
    #: growth below this many ms is timer noise on tiny models, never a regression
    latency_slack_ms: float = 0.05

    def to_dict(self) -> dict:
        return {"latency_pct": self.latency_pct, "size_pct": self.size_pct, "cosine_drop": self.cosine_drop,
                "latency_slack_ms": self.latency_slack_ms}


DEFAULT = Thresholds()
OFF = Thresholds(None, None, None)


def parse_spec(spec: "str | Thresholds | None") -> Thresholds:
    """``latency=20%,size=10%,cosine=0.01``; ``off`` disables; a missing key keeps its default, ``KEY=off`` drops it."""
    if spec is None:
        return DEFAULT
    if isinstance(spec, Thresholds):
        return spec
    text = str(spec).strip().lower()
    if text in ("off", "none", "no", "0", "false"):
        return OFF
    vals = {k: v for k, v in DEFAULT.to_dict().items() if k != "latency_slack_ms"}
    keys = {"latency": "latency_pct", "size": "size_pct", "cosine": "cosine_drop", "parity": "cosine_drop"}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(latency|size|cosine|parity)\s*=\s*(off|[0-9]*\.?[0-9]+)\s*(%?)", part)
        if not m:
            raise UsageError(f"--max-regression {spec!r}: expected e.g. latency=20%,size=10%,cosine=0.01 or off")
        vals[keys[m.group(1)]] = None if m.group(2) == "off" else float(m.group(2))
    return Thresholds(**vals)


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v else None


def latency_metrics(report: Mapping | None) -> dict[str, float]:
    """Batch-1 latency figures a report carries, by name (validate and optimize reports differ)."""
    data = (report or {}).get("data") or {}
    lat = data.get("latency") if isinstance(data.get("latency"), Mapping) else {}
    out: dict[str, float] = {}
    cand = lat.get("candidate") if isinstance(lat.get("candidate"), Mapping) else {}
    b1 = cand.get("1") or cand.get(1) or {}
    if isinstance(b1, Mapping):
        for key in ("p99_ms", "p50_ms"):
            if _num(b1.get(key)) is not None:
                out[key] = _num(b1[key])
    if _num(lat.get("candidate_p50_ms")) is not None:
        out.setdefault("p50_ms", _num(lat["candidate_p50_ms"]))
    return out


def _samples(report: Mapping | None) -> list[float]:
    """The batch-1 per-run times a validate report keeps (empty when it has none)."""
    lat = ((report or {}).get("data") or {}).get("latency")
    cand = (lat or {}).get("candidate") if isinstance(lat, Mapping) else None
    b1 = (cand.get("1") or cand.get(1) or {}) if isinstance(cand, Mapping) else {}
    xs = b1.get("samples_ms") if isinstance(b1, Mapping) else None
    return [float(x) for x in xs if _num(x) is not None] if isinstance(xs, list) else []


def _decided(name: str, new: list[float], old: list[float], limits: Thresholds) -> CheckResult:
    """Latency growth judged by the one rule (retool.speed): the two runs' p50 intervals give the growth
    ratio's interval; it fails only when the whole interval is above the limit. The two runs were timed
    apart (perhaps on a machine loaded differently), so an undecided growth passes, with its reason; a
    p99 from one short run moved 35 % between identical runs here, which is why the p50 decides."""
    from retool import speed

    n, nlo, nhi = speed.sample_interval(new)
    o, olo, ohi = speed.sample_interval(old)
    d = speed.decide(n / o, nlo / ohi, nhi / olo, 1 + limits.latency_pct / 100, higher_is_better=False,
                     rule=speed.rule_text("sample") + "; growth = new p50 / published p50", samples=min(len(new), len(old)))
    ok = d.outcome != speed.FAIL or (n - o) <= limits.latency_slack_ms
    growth = 100.0 * (n / o - 1.0)
    return CheckResult(name, ok, round(growth, 2), limits.latency_pct,
                       f"p50_ms {n:.3g} vs {o:.3g} ms ({growth:+.1f}%, limit +{limits.latency_pct:g}%; {d.text})",
                       {"metric": "p50_ms", "new": n, "old": o, "decision": d.to_dict()})


def min_cosine(report: Mapping | None) -> float | None:
    vals = [_num((c.get("details") or {}).get("cosine")) for c in (report or {}).get("checks") or ()
            if isinstance(c, Mapping)]
    vals = [v for v in vals if v is not None]
    return min(vals) if vals else None


def compare(new_report: Mapping | None, new_size: int, old_manifest: Mapping, limits: Thresholds) -> list[CheckResult]:
    """Checks of the new artifact against one published version (its manifest)."""
    old_v = old_manifest.get("version")
    old_report = old_manifest.get("report")
    old_size = sum(int(f.get("size", 0)) for k, f in (old_manifest.get("files") or {}).items()
                   if k != "samples.npz")  # the model's size, not its serving samples
    label = f"v{old_v}"
    checks = []

    def skipped(name, why):
        checks.append(CheckResult(name, True, message=f"not compared: {why}", severity="info"))

    # latency: compare like with like, p99 first
    name = f"regression.latency vs {label}"
    if limits.latency_pct is None:
        skipped(name, "latency gate off")
    else:
        new_l, old_l = latency_metrics(new_report), latency_metrics(old_report)
        key = next((k for k in ("p99_ms", "p50_ms") if k in new_l and k in old_l), None)
        if key is None:
            why = ("the new artifact's report has no batch-1 latency" if not new_l else
                   f"{label}'s report has no batch-1 latency")
            skipped(name, why)
        elif old_l[key] <= 0:
            skipped(name, f"{label}'s {key} is zero")
        elif _samples(new_report) and _samples(old_report):
            checks.append(_decided(name, _samples(new_report), _samples(old_report), limits))
        else:
            growth = 100.0 * (new_l[key] / old_l[key] - 1.0)
            ok = growth <= limits.latency_pct or new_l[key] - old_l[key] <= limits.latency_slack_ms
            checks.append(CheckResult(name, ok, round(growth, 2), limits.latency_pct,
                                      f"{key} {new_l[key]:.3g} vs {old_l[key]:.3g} ms ({growth:+.1f}%, "
                                      f"limit +{limits.latency_pct:g}%)",
                                      {"metric": key, "new": new_l[key], "old": old_l[key]}))
    name = f"regression.size vs {label}"
    if limits.size_pct is None:
        skipped(name, "size gate off")
    elif old_size <= 0:
        skipped(name, f"{label} lists no file sizes")
    else:
        growth = 100.0 * (new_size / old_size - 1.0)
        checks.append(CheckResult(name, growth <= limits.size_pct, round(growth, 2), limits.size_pct,
                                  f"{new_size / 1e6:.3g} vs {old_size / 1e6:.3g} MB ({growth:+.1f}%, "
                                  f"limit +{limits.size_pct:g}%)", {"new": new_size, "old": old_size}))
    name = f"regression.parity vs {label}"
    if limits.cosine_drop is None:
        skipped(name, "parity gate off")
    else:
        new_c, old_c = min_cosine(new_report), min_cosine(old_report)
        if new_c is None or old_c is None:
            skipped(name, "the new artifact's report has no parity cosine" if new_c is None
                    else f"{label}'s report has no parity cosine")
        else:
            drop = old_c - new_c
            checks.append(CheckResult(name, drop <= limits.cosine_drop, round(drop, 6), limits.cosine_drop,
                                      f"min cosine {new_c:.6f} vs {old_c:.6f} (drop {drop:.4g}, "
                                      f"limit {limits.cosine_drop:g})", {"new": new_c, "old": old_c}))
    return checks
