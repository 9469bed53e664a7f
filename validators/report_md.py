"""report.md: short enough for a GitHub Actions job summary ($GITHUB_STEP_SUMMARY)."""
from __future__ import annotations

from retool.types import Report


def _md_table(headers, rows) -> str:
    def cell(v) -> str:
        return str(v if v is not None else "").replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render_markdown(report: Report) -> str:
    from retool.validators.tables import GATE_HEADERS, SUMMARY_HEADERS, gate_rows, summary_rows

    d = report.data
    cand = d.get("candidate") or {}
    ref = d.get("reference") or {}
    verdict = "✅ PASS" if report.passed else "❌ FAIL"
    failed = [c.name for c in report.failed_checks]
    parts = [
        f"## retool validate: {verdict}",
        "",
        f"**Candidate** `{cand.get('path')}` ({cand.get('precision')}, opset {cand.get('opset')}, "
        f"{d.get('size_mb', 0):.3f} MB, sha256 `{(cand.get('sha256') or '')[:12]}`)  ",
        f"**Reference** {('`' + str(ref.get('label')) + '` (' + str(ref.get('kind')) + ')') if ref else 'none'}  ",
        f"**Threads** {d.get('threads')} intra-op · **batch sizes** {', '.join(map(str, d.get('batch_sizes', [])))}"
        f" (parity at {', '.join(map(str, d.get('parity_batch_sizes', [])))})",
        "",
    ]
    if failed:
        parts += [f"**Failed gates:** {', '.join(f'`{n}`' for n in failed)}", ""]
    chk = d.get("checked") or {}
    if chk.get("not_checked"):
        parts += [f"**Not checked:** {'; '.join(chk['not_checked'])}", ""]
    if (d.get("latency") or {}).get("off_target"):
        parts += [f"**Latency:** {d['latency']['off_target']}", ""]
    if (d.get("latency") or {}).get("measured") and d.get("machine"):
        from retool.machine import describe

        icon = "⚠️ " if d["machine"].get("busy") else ""
        parts += [f"**Machine while timing:** {icon}{describe(d['machine'])}", ""]
    parts += [_md_table(SUMMARY_HEADERS, summary_rows(report)), ""]
    if isinstance(d.get("serving"), dict):
        from retool.validators.serving_render import serving_markdown

        parts += [serving_markdown(d["serving"]), ""]
    rows = gate_rows(report)
    if rows:
        parts += ["<details><summary>All gates</summary>", "", _md_table(GATE_HEADERS, rows), "", "</details>", ""]
    for mode in ("teacher_forced", "free_running"):  # decoders: one line per generation mode
        g = (d.get("generation") or {}).get(mode)
        if g:
            steps = " ".join("".join("✓" if a else "✗" for a in r["per_step"]["agree"][:64]) for r in g.get("rows", []))
            parts += [f"**Generation, {mode.replace('_', ' ')}:** {g['agreement']}/{g['steps']} tokens agree, "
                      f"min step cosine {g['min_cosine']:.5f}, first divergence {'none' if g['first_divergence'] is None else 'step ' + str(g['first_divergence'])}  ",
                      f"`{steps}`", ""]
    prov = d.get("providers") or {}
    if prov.get("nodes_per_provider"):
        placed = ", ".join(f"{p}: {n}" for p, n in prov["nodes_per_provider"].items())
        parts += [f"**Node placement** ({prov.get('method')}): {placed}", ""]
    if report.warnings:
        parts += ["**Warnings**", ""] + [f"- {w}" for w in report.warnings] + [""]
    env = d.get("environment") or {}
    parts.append(f"<sub>retool report schema {report.schema_version} · {report.created} · "
                 f"python {env.get('python')} · onnxruntime {(env.get('versions') or {}).get('onnxruntime')} · "
                 f"{env.get('platform')}</sub>")
    return "\n".join(parts) + "\n"
