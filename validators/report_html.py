"""report.html: one self-contained page (inline CSS and SVG, no scripts, no network)."""
from __future__ import annotations

import html
import math
import re
from typing import Mapping, Sequence

from retool.types import Report

COLORS = {"candidate": "#2563eb", "reference": "#f97316"}
SERIES = ["#2563eb", "#f97316", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777"]

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f8fafc;color:#0f172a}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e2e8f0;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 4px;color:#334155}
.verdict{display:inline-block;padding:2px 10px;border-radius:12px;color:#fff;font-weight:600;margin-left:8px}
.pass{background:#16a34a}.fail{background:#dc2626}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:18px}.card span{color:#64748b;font-size:12px}
table{border-collapse:collapse;background:#fff;width:100%;margin:6px 0;font-size:13px}
th,td{border:1px solid #e2e8f0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f1f5f9} td.PASS{color:#15803d;font-weight:600} td.FAIL{color:#b91c1c;font-weight:700}
.plots{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{background:#fff;border:1px solid #e2e8f0;border-radius:8px;margin:0;padding:8px}
figcaption{font-size:12px;color:#475569;margin-bottom:4px}
svg text{font:11px system-ui,sans-serif;fill:#334155}
.muted{color:#64748b}.small{font-size:12px}
code{background:#f1f5f9;padding:0 3px;border-radius:3px}
.failed{color:#b91c1c;margin:6px 0}
"""


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _table(headers: Sequence[str], rows: Sequence[Sequence], result_col: int | None = None) -> str:
    out = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in headers), "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>")
        for i, c in enumerate(r):
            cls = f' class="{_e(c)}"' if i == result_col and c in ("PASS", "FAIL") else ""
            out.append(f"<td{cls}>{_e(c)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _nice_max(v: float) -> float:
    if v <= 0 or not math.isfinite(v):
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * exp >= v:
            return m * exp
    return 10 * exp


def _fmt(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v / 1e6:.3g}M"
    if abs(v) >= 1e3:
        return f"{v / 1e3:.3g}k"
    return f"{v:.3g}"


#: The latency axis ends at this percentile of the samples (times 1.25): one 100x outlier must not
#: squash every other run into the first pixel. Points beyond are drawn as marks on the edge, counted.
AXIS_PERCENTILE = 95


def latency_axis_max(stats: Mapping[str, Mapping]) -> float:
    import numpy as np

    highs = []
    for s in stats.values():
        samples = s.get("samples_ms") or []
        highs.append(float(np.percentile(samples, AXIS_PERCENTILE)) if len(samples) >= 5 else s["p99_ms"])
        highs.append(s["p50_ms"] * 1.5)
    return _nice_max(max(highs) * 1.25)


def latency_svg(batch: str, stats: Mapping[str, Mapping]) -> str:
    """One row per variant: every sample as a dot (jittered), the p25-p75 box, the median and p99 marks.

    The axis is clipped at a high percentile; clipped samples (and a clipped p99) are drawn as
    red marks on the right edge with their count."""
    import numpy as np
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    from retool.validators.svgplot import figure, to_svg

    names = [n for n in ("candidate", "reference") if n in stats]
    hi = latency_axis_max(stats)
    fig = figure(4.9, 0.85 + 0.62 * len(names))
    ax = fig.add_subplot()
    for r, name in enumerate(names):
        s = stats[name]
        col = COLORS.get(name, "#475569")
        samples = np.asarray(s.get("samples_ms") or [], dtype=float)
        jitter = (((np.arange(samples.size) * 7919) % 23) - 11) / 11 * 0.2
        shown = samples <= hi
        # gid: the test counts one mark per run inside this group
        ax.scatter(samples[shown], r + jitter[shown], s=7, color=col, alpha=0.35, linewidths=0, zorder=2,
                   gid=f"runs-{batch}-{name}")
        if (~shown).any():
            ax.scatter(np.full(int((~shown).sum()), hi), r + jitter[~shown], marker=">", s=22, color="#dc2626",
                       clip_on=False, zorder=4, gid=f"clipped-{batch}-{name}")
            ax.annotate(f"{int((~shown).sum())} slower run(s) beyond {_fmt(hi)} ms, max {_fmt(samples.max())} ms →",
                        (hi, r - 0.36), ha="right", va="bottom", fontsize=7, color="#dc2626",
                        gid=f"clipped-{batch}-{name}-label")
        if samples.size:
            q1, q3 = np.percentile(samples, [25, 75])
            ax.add_patch(Rectangle((q1, r - 0.28), max(q3 - q1, hi * 0.003), 0.56, fill=False, edgecolor=col,
                                   lw=1.5, zorder=3))
        ax.plot([s["p50_ms"]] * 2, [r - 0.36, r + 0.36], color=col, lw=3, zorder=3, solid_capstyle="butt")
        p99 = min(s["p99_ms"], hi)  # a clipped p99 sits on the edge, in red
        ax.plot([p99] * 2, [r - 0.24, r + 0.24], color="#dc2626" if s["p99_ms"] > hi else col, lw=1.5,
                ls=(0, (3, 2)), zorder=3)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(0, hi)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, min_n_ticks=4))
    ax.set_xlabel("ms per batch")
    ax.grid(axis="x", color="#e2e8f0", lw=0.8)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    svg = to_svg(fig, key=f"latency-{batch}", css_class="plot latency", label=f"latency distribution at batch {batch}")
    return re.sub(r'<g id="(clipped-[^"]*)"', r'<g class="clipped" id="\1"', svg)  # the marks off the axis


def throughput_svg(latency: Mapping) -> str:
    """Items per second (from the median) against batch size (log2 x axis), one line per variant; the
    error bars span the throughput at the p75 and p25 latencies, where the runs were kept.

    Only drawn for two or more batch sizes (render_html leaves it out otherwise)."""
    import numpy as np
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullFormatter, NullLocator

    from retool.validators.svgplot import figure, to_svg

    fig = figure(4.9, 2.9)
    ax = fig.add_subplot()
    batches = set()
    for k, name in enumerate(n for n in ("candidate", "reference") if latency.get(n)):
        col = COLORS.get(name, SERIES[k % len(SERIES)])
        pts = sorted((int(b), s) for b, s in latency[name].items())
        xs, ys = [b for b, _ in pts], [s["throughput_per_s"] for _, s in pts]
        batches.update(xs)
        # a single point is no curve
        ax.plot(xs, ys, color=col, lw=2, ls="-" if len(xs) > 1 else "none", marker="o", ms=4.5, label=name,
                gid=f"items-{name}")
        lo, up = [], []
        for (b, s), y in zip(pts, ys):
            runs = s.get("samples_ms") or []
            if len(runs) >= 4:
                q1, q3 = np.percentile(runs, [25, 75])
                lo.append(max(0.0, y - b * 1000.0 / q3))
                up.append(max(0.0, b * 1000.0 / q1 - y))
            else:
                lo.append(0.0)
                up.append(0.0)
        if any(lo) or any(up):
            ax.errorbar(xs, ys, yerr=[lo, up], fmt="none", ecolor=col, elinewidth=1, capsize=3)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(batches)))
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.yaxis.set_major_formatter(lambda v, _: _fmt(v))
    ax.set_xlabel("batch size")
    ax.set_ylabel("items / s")
    ax.grid(color="#e2e8f0", lw=0.8)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return to_svg(fig, key="throughput", css_class="plot throughput", label="throughput against batch size")


def error_hist_svg(output: str, entries: Mapping[int, Mapping]) -> str:
    """Fractions of |candidate - reference| per log10 bin, one bar series per batch size."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    from retool.validators.svgplot import figure, to_svg

    edges = next(iter(entries.values()))["histogram"]["log10_abs_error_edges"]
    batches = sorted(entries)
    fig = figure(4.9, 2.7)
    ax = fig.add_subplot()
    width = (edges[1] - edges[0]) * 0.85 / max(1, len(batches))
    for k, b in enumerate(batches):
        counts = entries[b]["histogram"]["counts"]
        total = max(1, sum(counts))  # fractions, not counts: batch sizes with more values share one axis
        left = [edges[i] + (edges[i + 1] - edges[i]) * 0.075 + k * width for i in range(len(counts))]
        ax.bar(left, [c / total for c in counts], width=width, align="edge", color=SERIES[k % len(SERIES)],
               label=f"batch {b}")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.xaxis.set_major_formatter(lambda v, _: f"1e{v:g}")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("absolute error |candidate − reference| (log scale)")
    ax.set_ylabel("share of values")
    ax.grid(axis="y", color="#e2e8f0", lw=0.8)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return to_svg(fig, key=f"errhist-{output}", css_class="plot errhist", label=f"error histogram of {output}")


def render_html(report: Report) -> str:
    from retool.validators.tables import GATE_HEADERS, SUMMARY_HEADERS, gate_rows, summary_rows

    d = report.data
    cand = d.get("candidate") or {}
    ref = d.get("reference") or {}
    lat = d.get("latency") or {}
    verdict = ("pass", "PASS") if report.passed else ("fail", "FAIL")
    body = [f'<h1>retool validate<span class="verdict {verdict[0]}">{verdict[1]}</span></h1>',
            f'<div class="muted">{_e(cand.get("path"))} against {_e(ref.get("label") or "no reference")}'
            f' · {_e(report.created)}</div>']
    if report.failed_checks:
        body.append('<p class="failed"><b>Failed gates:</b> '
                    + ", ".join(f"<code>{_e(c.name)}</code>" for c in report.failed_checks) + "</p>")
    cards = [("size", f"{d.get('size_mb', 0):.3f} MB"), ("precision", cand.get("precision")),
             ("threads", d.get("threads")), ("batch sizes", ", ".join(map(str, d.get("batch_sizes", []))))]
    sp = lat.get("speedup_stats") or lat.get("speedup") or {}
    if sp:
        from retool.speed import format_entry

        from retool.speed import format_decision

        decided = {c.name.partition("@batch")[2]: c.details["decision"] for c in report.checks
                   if c.name.startswith(("speedup@", "not-slower@")) and (c.details or {}).get("decision")}
        for b, v in sorted(sp.items(), key=lambda t: int(t[0])):
            cards.append((f"speed-up at batch {b} (ref p50 / cand p50)",
                          format_decision(decided[b]) if b in decided else format_entry(v)))
    if lat.get("off_target"):
        cards.append(("latency", lat["off_target"]))
    failed = report.failed_checks
    cards.append(("gates failed", f"{len(failed)} / {sum(1 for c in report.checks if c.severity == 'gate')}"))
    body.append('<div class="cards">' + "".join(f"<div class=\"card\"><b>{_e(v)}</b><span>{_e(k)}</span></div>"
                                                for k, v in cards) + "</div>")
    chk = d.get("checked") or {}
    if chk.get("not_checked"):
        body.append(f'<p><b>Not checked:</b> {_e("; ".join(chk["not_checked"]))}</p>')
    if lat.get("measured") and d.get("machine"):
        from retool.machine import describe

        cls = ' class="busy"' if d["machine"].get("busy") else ""
        body.append(f'<p{cls}><b>Machine while timing:</b> {_e(describe(d["machine"]))}</p>')
    body.append("<h2>Summary</h2>" + _table(SUMMARY_HEADERS, summary_rows(report), result_col=5))
    if isinstance(d.get("serving"), Mapping):
        from retool.validators.serving_render import serving_html

        body.append(serving_html(d["serving"]))
    if lat.get("candidate"):
        where = f' {_e(lat["off_target"])}.' if lat.get("off_target") else ""
        body.append('<h2>Latency</h2><div class="small muted">Each dot is one run; box p25–p75, thick mark p50, '
                    f'dashed mark p99; the axis ends at the {AXIS_PERCENTILE}th percentile (x1.25), slower runs '
                    f'are red marks on the edge. {d.get("threads")} intra-op threads; variants interleaved.{where}</div>'
                    '<div class="plots">')
        for b in sorted(lat["candidate"], key=int):
            stats = {n: lat[n][b] for n in ("candidate", "reference") if b in (lat.get(n) or {})}
            body.append(f"<figure><figcaption>latency distribution, batch {_e(b)}</figcaption>"
                        f"{latency_svg(b, stats)}</figure>")
        if len(lat["candidate"]) > 1:
            body.append(f"<figure><figcaption>throughput (from the median) against batch size</figcaption>"
                        f"{throughput_svg(lat)}</figure>")
        body.append("</div>")
        rows = []
        for n in ("candidate", "reference"):
            for b, s in sorted((lat.get(n) or {}).items(), key=lambda t: int(t[0])):
                rows.append([n, b, _num(s["p50_ms"]), _num(s["p90_ms"]), _num(s["p99_ms"]), _num(s["mean_ms"]),
                             _num(s["std_ms"]), f"{s['throughput_per_s']:.0f}", s["runs"]])
        body.append(_table(["variant", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "items/s (p50)", "runs"], rows))
    parity = d.get("parity") or {}
    if parity:
        body.append('<h2>Parity</h2><div class="plots">')
        by_out: dict[str, dict[int, Mapping]] = {}
        for e in parity.values():
            if e.get("histogram"):
                by_out.setdefault(e["output"], {})[int(e["batch"])] = e
        for out, entries in by_out.items():
            body.append(f"<figure><figcaption>error histogram, output <code>{_e(out)}</code></figcaption>"
                        f"{error_hist_svg(out, entries)}</figure>")
        body.append("</div>")
        rows = [[e.get("output"), e.get("batch"), _num(e.get("max_abs")), _num(e.get("mean_abs")),
                 _num(e.get("p99_abs")), _num(e.get("max_rel")), _num(e.get("cosine"), 6),
                 "PASS" if e.get("passed") else "FAIL"] for e in parity.values()]
        body.append(_table(["output", "batch", "max abs", "mean abs", "p99 abs", "max rel", "cosine", "result"],
                           rows, result_col=7))
    if d.get("generation"):
        body.append(generation_html(d["generation"]))
    body.append("<h2>Gates</h2>" + _table(GATE_HEADERS, gate_rows(report), result_col=3))
    prov = d.get("providers") or {}
    if prov.get("ops_per_provider"):
        rows = [[p, op, n] for p, ops in prov["ops_per_provider"].items() for op, n in ops.items()]
        body.append(f"<h2>Execution providers</h2><div class=\"small muted\">{_e(prov.get('method'))}; session "
                    f"providers: {_e(', '.join(prov.get('session', [])))}</div>"
                    + _table(["provider", "operator", "nodes"], rows))
    if report.warnings:
        body.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{_e(w)}</li>" for w in report.warnings) + "</ul>")
    env = d.get("environment") or {}
    body.append(f'<p class="small muted">report schema {_e(report.schema_version)} · python {_e(env.get("python"))} · '
                f'{_e(", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items()))} · '
                f'{_e(env.get("platform"))} · {_e(env.get("cpus_usable"))} usable CPUs</p>')
    title = f"retool validate: {verdict[1]} {cand.get('path', '')}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body><main>{''.join(body)}</main></body></html>\n")


def generation_html(gen: Mapping) -> str:
    """Per-step agreement (one cell per generated token: green agrees, red differs) and logit cosine."""
    out = ['<h2>Generation</h2><div class="small muted">Greedy decoding of seeded prompts with the cache, '
           'against the reference; each cell is one generated token (hover: step, cosine, reference margin).</div>']
    for mode in ("teacher_forced", "free_running"):
        g = gen.get(mode)
        if not g:
            continue
        rows = []
        for i, r in enumerate(g.get("rows", [])):
            ps = r["per_step"]
            cells = "".join(
                f'<span title="step {t}: cosine {c:.5f}, margin {m:.3g}" style="display:inline-block;width:7px;'
                f'height:12px;margin-right:1px;background:{"#2e7d32" if a else "#c62828"};opacity:'
                f'{max(0.35, min(1.0, (c - 0.9) * 10)):.2f}"></span>'
                for t, (a, c, m) in enumerate(zip(ps["agree"], ps["cosine"], ps["margin"])))
            rows.append([i, f"{r['agreement']}/{r['steps']}", "" if r["first_divergence"] is None
                         else r["first_divergence"], _num(r["min_cosine"], 6), _num(r["max_abs_diff"]),
                         _num(r["min_margin"]), cells])
        head = ["prompt", "agreement", "first divergence", "min cosine", "max logit diff", "min ref margin", "steps"]
        html = _table(head, rows)
        for i, r in enumerate(g.get("rows", [])):  # _table escapes; the step strip is our own markup
            html = html.replace(_e(rows[i][-1]), rows[i][-1], 1)
        out.append(f"<h3>{_e(mode.replace('_', ' '))}: {g['agreement']}/{g['steps']} tokens, min cosine "
                   f"{g['min_cosine']:.5f}</h3>" + html)
    return "".join(out)


def _num(v, digits: int = 3) -> str:
    if isinstance(v, (int, float)):
        return f"{v:.{digits}g}" if digits == 3 else f"{v:.{digits}f}"
    return "" if v is None else str(v)
