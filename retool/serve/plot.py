"""The load-test report's pictures and table: p99 latency against throughput, one line per
configuration, the budget as a line, the chosen point marked (inline SVG, no dependencies)."""
from __future__ import annotations

from html import escape

COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d", "#475569",
           "#a16207", "#0f766e", "#7c3aed")


def svg(report: dict, w: int = 820, h: int = 420) -> str:
    cfgs = [c for c in report["configs"] if c["points"]]
    pts = [p for c in cfgs for p in c["points"]]
    budget = report.get("budget_p99_ms")
    left, right, top, bottom = 60, 300, 30, 50
    pw, ph = w - left - right, h - top - bottom
    xmax = max([p["throughput"] for p in pts] + [1.0]) * 1.08
    ymax = max([p["p99_ms"] for p in pts] + ([budget * 1.2] if budget else []) + [1.0]) * 1.08

    def x(v):
        return left + pw * v / xmax

    def y(v):
        return top + ph * (1 - v / ymax)

    title = f"{report['model']} v{report['version']}: p99 latency vs throughput"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             f'font-family="system-ui,sans-serif" font-size="11">',
             f'<text x="{left}" y="18" font-size="13" font-weight="600">{escape(title)}</text>',
             f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#334155"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#334155"/>',
             f'<text x="{left + pw / 2}" y="{h - 12}" text-anchor="middle">throughput (inferences/s)</text>',
             f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})" '
             f'text-anchor="middle">client p99 (ms)</text>']
    for i in range(6):
        xv, yv = xmax * i / 5, ymax * i / 5
        parts.append(f'<text x="{x(xv):.1f}" y="{top + ph + 15}" text-anchor="middle">{xv:.0f}</text>')
        parts.append(f'<text x="{left - 6}" y="{y(yv) + 4:.1f}" text-anchor="end">{yv:.1f}</text>')
    if budget:
        parts.append(f'<line x1="{left}" y1="{y(budget):.1f}" x2="{left + pw}" y2="{y(budget):.1f}" '
                     f'stroke="#64748b" stroke-dasharray="6 4"/>')
        parts.append(f'<text x="{left + pw - 4}" y="{y(budget) - 5:.1f}" text-anchor="end" fill="#64748b">'
                     f'budget p99 {budget:g} ms</text>')
    for i, c in enumerate(cfgs):
        col = COLOURS[i % len(COLOURS)]
        seq = sorted(c["points"], key=lambda p: p["load"])
        line = " ".join(f"{x(p['throughput']):.1f},{y(p['p99_ms']):.1f}" for p in seq)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{col}" stroke-width="1.6"/>')
        for p in seq:
            parts.append(f'<circle cx="{x(p["throughput"]):.1f}" cy="{y(p["p99_ms"]):.1f}" r="2.6" fill="{col}">'
                         f'<title>{escape(c["label"])}: {p["mode"]} {p["load"]:g}, {p["throughput"]:.0f}/s, '
                         f'p99 {p["p99_ms"]:.2f} ms</title></circle>')
        ly = top + 8 + 15 * i
        parts.append(f'<line x1="{left + pw + 12}" y1="{ly}" x2="{left + pw + 28}" y2="{ly}" stroke="{col}" '
                     f'stroke-width="2"/><text x="{left + pw + 32}" y="{ly + 4}">{escape(c["label"])}</text>')
    ch = report.get("chosen")
    if ch:
        p = ch["point"]
        parts.append(f'<circle cx="{x(p["throughput"]):.1f}" cy="{y(p["p99_ms"]):.1f}" r="8" fill="none" '
                     f'stroke="#0f172a" stroke-width="2"><title>chosen: {escape(ch["label"])}</title></circle>')
        parts.append(f'<text x="{x(p["throughput"]) + 10:.1f}" y="{y(p["p99_ms"]) + 16:.1f}" font-weight="600">'
                     f'chosen</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def table_rows(report: dict) -> list[list]:
    rows = []
    chosen = (report.get("chosen") or {}).get("label")
    for c in report["configs"]:
        if c.get("error"):
            rows.append([c["label"], "", "", "", "", "", "", "", "error: " + c["error"][:80]])
        for p in c["points"]:
            mark = "CHOSEN" if c["label"] == chosen and c["best"] == p else ("best" if c["best"] == p else "")
            rows.append([c["label"], f"{p['mode'][:4]} {p['load']:g}", round(p["throughput"], 1),
                         round(p["p50_ms"], 2), round(p["p90_ms"], 2), round(p["p99_ms"], 2), round(p["queue_ms"], 2),
                         round(p["compute_ms"], 2), mark])
    return rows


HEADERS = ["configuration", "load", "infer/s", "p50 ms", "p90 ms", "p99 ms", "queue ms", "compute ms", ""]


def markdown(report: dict) -> str:
    lines = ["| " + " | ".join(h or "note" for h in HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in table_rows(report)]
    return "\n".join(lines)
