"""The validate report's tables: the summary (parity, latency, throughput, speed-up, size) and the gates.

Printed by ``retool validate`` and rendered into report.md and report.html.
"""
from __future__ import annotations

from typing import Mapping

from retool import console
from retool.types import CheckResult, Report


def summary_rows(report: Report) -> list[list[str]]:
    """The one table: parity, latency, throughput, speedup and size, with gate thresholds and results.

    Columns: check, batch, candidate, reference, threshold, result.
    """
    d = report.data
    gates = {c.name: c for c in report.checks if c.severity == "gate"}
    rows: list[list[str]] = []
    for c in report.checks:
        if c.severity != "gate" or c.name.startswith(("latency:", "speedup@", "not-slower@", "size")):
            continue
        name, _, batch = c.name.partition("@batch")
        det = c.details or {}
        if "max_abs" in det:
            value = f"max_abs {_g(det.get('max_abs'))}, cos {_cos(det.get('cosine'))}"
            if "top1" in det:
                value += f", top1 {det['top1']:.3f}"
        elif "mismatches" in det:
            value = f"{det['mismatches']} mismatches"
        else:
            value = c.message
        rows.append([name.replace("parity:", "parity ").replace("batch-consistency:", "batch rows "), batch,
                     value, "", _tol_text(c.threshold), _result(c)])
    lat = d.get("latency") or {}
    for key in sorted(lat.get("candidate", {}), key=int):
        cs, rs = lat["candidate"][key], lat.get("reference", {}).get(key)
        g = gates.get(f"latency:p99@batch{key}")
        where = " (on CPU, not the target's hardware)" if lat.get("off_target") else ""
        busy = " (busy machine)" if (d.get("machine") or {}).get("busy") else ""
        rows.append([f"latency p50 / p99 ms{where}{busy}", key, f"{_g(cs['p50_ms'])} / {_g(cs['p99_ms'])}"
                     + (f" (thread CPU p50 {_g(cs['cpu_p50_ms'])})" if "cpu_p50_ms" in cs and d.get("threads") == 1
                        else ""),
                     f"{_g(rs['p50_ms'])} / {_g(rs['p99_ms'])}" if rs else "",
                     f"p99 per batch of {key} <= {g.threshold:g} ms ({cs['runs']} runs)" if g and cs.get("runs")
                     else f"p99 per batch of {key} <= {g.threshold:g} ms" if g else "", _result(g)])
        rows.append(["throughput /s (from p50)", key, f"{cs['throughput_per_s']:.0f}",
                     f"{rs['throughput_per_s']:.0f}" if rs else "", "", ""])
        sp = (lat.get("speedup_stats") or {}).get(key, lat.get("speedup", {}).get(key))
        g = gates.get(f"speedup@batch{key}")
        ns = gates.get(f"not-slower@batch{key}")
        if sp is not None or g is not None:
            from retool.speed import format_entry

            thr = " and ".join(t for t in ((f">= {g.threshold:g}×" if g else ""), ("not slower" if ns else "")) if t)
            res = _result(g) if not ns else ("FAIL" if (not ns.passed or (g and not g.passed)) else _result(g or ns))
            dec = ((g or ns).details or {}).get("decision") if (g or ns) else None
            value = format_entry(sp) if sp is not None else "n/a"
            if dec:  # the interval the gate decided on, not the IQR, so the cell and the result agree
                from retool.speed import format_decision

                value = format_decision(dec)
            rows.append(["speed-up (ref p50 / cand p50)", key, value, "", thr, res])
    for name, g in gates.items():  # speedup gates at unmeasured batch sizes
        if (name.startswith("speedup@") or name.startswith("latency:")) and g.value is None:
            rows.append([name, name.partition("@batch")[2], "not measured", "", _g(g.threshold), _result(g)])
    g = gates.get("size")
    ref_mb = (d.get("reference") or {}).get("size_mb")
    rows.append(["size MB", "", _g(d.get("size_mb") or 0.0), _g(ref_mb) if ref_mb else "",
                 f"<= {g.threshold:g}" if g else "", _result(g)])
    return rows


SUMMARY_HEADERS = ["check", "batch", "candidate", "reference", "threshold", "result"]


def gate_rows(report: Report) -> list[list[str]]:
    from retool.validators.failure import gate_label, runs_per_batch

    runs = runs_per_batch(report)
    return [[gate_label(c, runs), _g(c.value) if not isinstance(c.value, str) else c.value, _tol_text(c.threshold),
             _result(c), c.message] for c in report.checks if c.severity == "gate"]


GATE_HEADERS = ["gate", "value", "threshold", "result", "note"]


def summary_text(report: Report) -> str:
    d = report.data
    lines = [console.table(SUMMARY_HEADERS, summary_rows(report))]
    ref = d.get("reference") or {}
    meta = (f"\n{'PASS' if report.passed else 'FAIL'}: {d['candidate']['path']} "
            f"({d['candidate']['precision']}) vs {ref.get('label') or 'no reference'}; "
            f"{d['threads']} intra-op threads")
    lines.append(meta)
    chk = d.get("checked") or {}
    if chk.get("not_checked"):
        lines.append("checked: " + "; ".join(chk.get("checked", [])))
        lines.append("NOT checked: " + "; ".join(chk["not_checked"]))
    off = (d.get("latency") or {}).get("off_target")
    if off:
        lines.append(f"latency: {off}")
    if (d.get("latency") or {}).get("measured") and d.get("machine"):
        from retool.machine import describe

        lines.append(f"machine while timing: {describe(d['machine'])}")
    return "\n".join(lines)


def _result(c: CheckResult | None) -> str:
    if c is None:
        return "-"
    res = "PASS" if c.passed else "FAIL"
    return f"undecided: {res}" if (c.details or {}).get("outcome") == "undecided" else res


def _g(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, float)):
        return f"{v:.3g}"
    return str(v)


def _cos(v) -> str:
    return f"{v:.6f}" if isinstance(v, (int, float)) else str(v)


def _tol_text(t) -> str:
    if isinstance(t, Mapping):
        parts = []
        for key, label in (("atol", "atol"), ("rtol", "rtol"), ("min_cosine", "cos>="), ("min_top1", "top1>=")):
            if t.get(key) is not None:
                parts.append(f"{label} {t[key]:g}" if key in ("atol", "rtol") else f"{label}{t[key]:g}")
        return " ".join(parts)
    return _g(t)
