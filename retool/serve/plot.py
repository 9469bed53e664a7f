"""The load-test report's picture and table: p99 latency against throughput, one line per configuration,
each point labelled with its concurrency or rate, the budget as a line, the chosen point ringed.

Drawn by matplotlib's SVG backend (imported on use); error bars wherever a point carries a spread
(``p99_range_ms`` and/or ``throughput_range``: [low, high])."""
from __future__ import annotations

from retool.validators.svgplot import SERIES as COLOURS

HEADERS = ["configuration", "load", "infer/s", "p50 ms", "p90 ms", "p99 ms", "queue ms", "compute ms", "note"]


def _load_label(p: dict) -> str:
    return f"c{p['load']:g}" if p.get("mode") == "concurrency" else f"{p['load']:g}/s"


def _err(points: list[dict], key: str, centre: str):
    """[[below...], [above...]] for matplotlib's errorbar, or None when no point has a spread."""
    if not any(p.get(key) for p in points):
        return None
    lo = [max(0.0, p[centre] - p[key][0]) if p.get(key) else 0.0 for p in points]
    hi = [max(0.0, p[key][1] - p[centre]) if p.get(key) else 0.0 for p in points]
    return [lo, hi]


def _bars(ax, points: list[dict], colour: str) -> None:
    xerr, yerr = _err(points, "throughput_range", "throughput"), _err(points, "p99_range_ms", "p99_ms")
    if xerr or yerr:
        ax.errorbar([p["throughput"] for p in points], [p["p99_ms"] for p in points], xerr=xerr, yerr=yerr, fmt="none",
                    ecolor=colour, elinewidth=0.9, capsize=3)


def svg(report: dict, w: int = 820, h: int = 420) -> str:
    """``report``: a loadtest report (tune.report()); returns one standalone ``<svg>`` element."""
    from matplotlib.ticker import MaxNLocator

    from retool.validators.svgplot import figure, to_svg

    cfgs = [c for c in report["configs"] if c["points"]]
    budget = report.get("budget_p99_ms")
    fig = figure(w / 96, h / 96)
    ax = fig.add_subplot()
    title = report.get("title") or f"{report['model']} v{report['version']}: p99 latency vs throughput"
    ax.set_title(title, loc="left", fontsize=10, fontweight="bold")
    for i, c in enumerate(cfgs):
        col = COLOURS[i % len(COLOURS)]
        seq = sorted(c["points"], key=lambda p: p["load"])
        xs, ys = [p["throughput"] for p in seq], [p["p99_ms"] for p in seq]
        ax.plot(xs, ys, color=col, lw=1.4, marker="o", ms=3.5, label=c["label"], gid=f"curve-{i}")
        _bars(ax, seq, col)
        for p in seq:
            ax.annotate(_load_label(p), (p["throughput"], p["p99_ms"]), xytext=(3, 3), textcoords="offset points",
                        fontsize=6.5, color=col)
    if budget:
        ax.axhline(budget, color="#64748b", ls=(0, (6, 4)), lw=1, label=f"budget p99 {budget:g} ms")
    ch = report.get("chosen")
    if ch and ch.get("point"):
        p = ch["point"]
        ax.plot([p["throughput"]], [p["p99_ms"]], "o", ms=13, mfc="none", mec="#0f172a", mew=1.8,
                label=f"chosen: {ch['label']}", gid="chosen")
        _bars(ax, [p], "#0f172a")
        ax.annotate("chosen", (p["throughput"], p["p99_ms"]), xytext=(9, -13), textcoords="offset points",
                    fontsize=8, fontweight="bold")
    if not cfgs and not (ch and ch.get("point")):
        ax.text(0.5, 0.5, "no configuration produced a measurement", transform=ax.transAxes, ha="center",
                color="#64748b")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0, top=max([ax.get_ylim()[1]] + ([budget * 1.2] if budget else [])))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, min_n_ticks=4))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, min_n_ticks=4))
    ax.set_xlabel("throughput (inferences/s)")
    ax.set_ylabel("client p99 (ms)")
    ax.grid(color="#e2e8f0", lw=0.8)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return to_svg(fig, key=f"loadtest-{report.get('model', '')}-{report.get('version', '')}", css_class="plot loadtest",
                  label=title)


def table_rows(report: dict) -> list[list]:
    rows = []
    chosen = (report.get("chosen") or {}).get("label")
    for c in report["configs"]:
        if c.get("error"):
            rows.append([c["label"], "", "", "", "", "", "", "", "error: " + c["error"][:80]])
        for p in c["points"]:
            mark = "CHOSEN" if c["label"] == chosen and c["best"] == p else ("best" if c["best"] == p else "")
            if not mark and any(d["estimate"] == p["p99_ms"] for d in c.get("undecided") or ()):
                mark = "within noise of budget"
            rows.append([c["label"], f"{p['mode'][:4]} {p['load']:g}", round(p["throughput"], 1),
                         round(p["p50_ms"], 2), round(p["p90_ms"], 2), round(p["p99_ms"], 2), round(p["queue_ms"], 2),
                         round(p["compute_ms"], 2), mark])
    return rows


def markdown(report: dict) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in table_rows(report)]
    return "\n".join(lines)
