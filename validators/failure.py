"""What a failed ``retool validate`` says: each failing gate by a name a reader understands, by how much it
missed, and what to do (``<problem>; <fix>``)."""
from __future__ import annotations

from typing import Mapping

from retool.types import CheckResult, Report

#: (gate-name prefix, fix): the first that matches applies
FIXES = (
    ("size", "quantize it (retool optimize --target cpu-int8) or raise --max-size-mb"),
    ("latency:", "optimise it for the target (retool optimize), time it on a quiet machine, or raise --max-p99-ms"),
    ("speedup@", "optimise it further (retool optimize) or lower --min-speedup"),
    ("not-slower@", "publish the fp32 build instead, or pass --allow-slower if slower is acceptable"),
    ("parity", "keep more nodes in float (retool optimize --accuracy-budget 8) or, if the difference is "
               "acceptable, loosen --atol/--rtol/--min-cosine"),
    ("batch-consistency", "rows of a batch affect each other: re-export with a dynamic batch axis or validate at "
                          "--batch-sizes 1"),
    ("run@", "the model fails at that batch size (see the gate's note): export it with a dynamic batch axis or drop "
             "the size from --batch-sizes"),
    ("onnxruntime.load", "onnxruntime cannot load it (see the gate's note): re-export or re-optimise it"),
    ("generation", "its generated tokens differ from the reference: use a wider precision (cpu, not cpu-int8)"),
)
UNDECIDED_FIX = "the timing could not decide: rerun on a quiet machine, with more --runs, or choose --undecided pass"


def runs_per_batch(report: Report) -> dict[str, int]:
    """Timed runs behind each batch size's latency figures, as {"32": 20}."""
    cand = ((report.data or {}).get("latency") or {}).get("candidate") or {}
    return {k: int(v["runs"]) for k, v in cand.items() if isinstance(v, Mapping) and v.get("runs")}


def gate_label(c: CheckResult, runs: Mapping[str, int] | None = None) -> str:
    """``latency:p99@batch32`` -> ``latency:p99@batch32 (per batch of 32, 20 runs)``: the budget applies to
    one call with 32 rows, and its p99 is the 99th percentile of that many timed calls."""
    name, _, batch = c.name.partition("@batch")
    if name.startswith("latency:") and batch:
        n = (runs or {}).get(batch)
        return f"{c.name} (per batch of {batch}" + (f", {n} runs)" if n else ")")
    return c.name


def _problem(c: CheckResult, runs: Mapping[str, int]) -> str:
    det = c.details or {}
    unit = {"x": "×", "": ""}.get(det.get("unit", ""), " " + str(det.get("unit")))
    if isinstance(c.value, (int, float)) and isinstance(c.threshold, (int, float)) and det.get("op") in ("<=", ">="):
        missed = ">" if det["op"] == "<=" else "<"
        return f"{gate_label(c, runs)} {c.value:.3g}{unit} {missed} {c.threshold:g}{unit}"
    note = (c.message or "").split(";")[0].strip()
    return f"{gate_label(c, runs)} ({note[:120]})" if note else gate_label(c, runs)


def _fix(c: CheckResult) -> str:
    if (c.details or {}).get("outcome") == "undecided":
        return UNDECIDED_FIX
    for prefix, fix in FIXES:
        if c.name.startswith(prefix):
            return fix
    return "see the gate table's note"


def failure_line(report: Report, candidate, report_dir=None, show: int = 3) -> str:
    """``<candidate>: N gate(s) failed: <problems>; <fixes>``, one line."""
    failed, runs = report.failed_checks, runs_per_batch(report)
    problems = ", ".join(_problem(c, runs) for c in failed[:show])
    more = f" and {len(failed) - show} more" if len(failed) > show else ""
    fixes = "; ".join(dict.fromkeys(_fix(c) for c in failed))
    where = f"; report: {report_dir}/report.json" if report_dir else ""
    return f"{candidate}: {len(failed)} gate(s) failed: {problems}{more}; {fixes}{where}"
