"""The readiness report's Serving section as text: ``serving_html``/``serving_markdown`` render what
`retool plan` chose for a latency budget and a rate (the dict of plan.json). Pure rendering, below the
report renderers that embed it (report_html, report_md) and ``report_serving.attach_serving``."""
from __future__ import annotations

import html
from typing import Any, Mapping

PLAN_KIND = "retool-serving-plan"


# ---- figures -> text --------------------------------------------------------------------------------------------
def _n(v, digits: int = 3) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "—" if v is None else str(v)
    return f"{v:.{digits}g}"


def _ms(v) -> str:
    return "—" if not isinstance(v, (int, float)) else f"{v:.2f} ms"


def _value(x):
    """A figure given as a number or as {"value", "interval"}: (value, interval or None)."""
    if isinstance(x, Mapping):
        iv = x.get("interval")
        return x.get("value"), (list(iv) if isinstance(iv, (list, tuple)) and len(iv) == 2 else None)
    return x, None


def _with_range(x, unit: str = "", digits: int = 4) -> str:
    v, iv = _value(x)
    if v is None:
        return "—"
    return f"{_n(v, digits)}{unit}" + (f" (range {_n(iv[0], digits)}–{_n(iv[1], digits)})" if iv else "")


def _config_text(cfg: Mapping) -> str:
    if not cfg:
        return "—"
    thr = cfg.get("intra_op_thread_count")
    parts = [f"{cfg.get('instance_count', '?')} instance(s)", f"{thr if thr else 'ORT default'} intra-op thread(s)"]
    if cfg.get("dynamic_batching"):
        pref = cfg.get("preferred_batch_size") or []
        parts.append(f"dynamic batching, max queue delay {cfg.get('max_queue_delay_microseconds', 0)} us"
                     + (f", preferred batch sizes {', '.join(map(str, pref))}" if pref else ""))
    else:
        parts.append("no dynamic batching")
    return "; ".join(parts)


def _outcome(conf: Mapping) -> str:
    """The confirmation's verdict, however the plan states it (outcome/decision, or met)."""
    if conf.get("outcome") or conf.get("decision"):
        out = str(conf.get("outcome") or "")
        dec = conf.get("decision")
        dec = dec.get("text") if isinstance(dec, Mapping) else dec
        return "; ".join(str(x) for x in (out, dec) if x)
    if "met" in conf:
        return "met the budget in every run" if conf["met"] else "a run missed the budget"
    return "—"


def facts(plan: Mapping) -> list[tuple[str, str]]:
    """The section's figures as (what, text) rows, shared by HTML and Markdown so both say the same."""
    inp = plan.get("inputs") or {}
    ch = plan.get("chosen") or {}
    conf = ch.get("confirmation") or {}
    cur = ch.get("currency") or inp.get("currency") or ""
    rows = [("budget", f"p99 <= {_n(inp.get('budget_p99_ms'))} ms"),
            ("rate", f"{_n(inp.get('rate'), 6)} req/s at peak"),
            ("profile", str(inp.get("profile") or "—")),
            ("replica", f"{_n(inp.get('cores_per_replica'))} core(s), headroom {_n(inp.get('headroom'))}"
             + (f", {_n(inp['price_per_hour'], 4)} {cur}/h" if inp.get("price_per_hour") is not None else ""))]
    if not ch:
        c = plan.get("closest") or {}
        rows.append(("chosen", "nothing meets the budget" + (
            f"; the closest, {c.get('label')}, misses by {_ms(c.get('over_budget_ms'))}" if c else "")))
        return rows
    lo_hi = ch.get("replicas_range") or []
    rows += [
        ("chosen variant", f"{ch.get('model')} v{ch.get('version')} ({ch.get('variant')}, {ch.get('precision') or '?'})"),
        *([("signature", str(ch["signature"]))] if ch.get("signature") else []),  # retool plan: signed by which key
        ("configuration", f"{ch.get('label')}: {_config_text(ch.get('config') or {})}"
         + (f"; max_batch_size {ch['max_batch_size']}" if ch.get("max_batch_size") is not None else "")),
        ("sustainable throughput per replica", _with_range(ch.get("sustainable_rate"), " req/s")),
        ("replicas", f"{ch.get('replicas')}" + (f" (range {lo_hi[0]}–{lo_hi[1]})" if len(lo_hi) == 2 else "")),
        ("p50 / p99", f"{_ms(conf.get('p50_ms', ch.get('p50_ms')))} / {_ms(conf.get('p99_ms', ch.get('p99_ms')))}"
         + (f" (p99 range {_n(conf['p99_range_ms'][0])}–{_n(conf['p99_range_ms'][1])} ms over {conf.get('runs')} "
            f"run(s) at {_n(conf.get('rate'), 6)} req/s per replica)" if conf.get("p99_range_ms") else "")),
        ("queue / compute", f"{_ms(conf.get('queue_ms', ch.get('queue_ms')))} / "
                            f"{_ms(conf.get('compute_ms', ch.get('compute_ms')))} on the server"),
        ("confirmation", _outcome(conf)),
    ]
    if ch.get("cost_per_million") is not None:
        rows += [("cost per 1M inferences", _with_range(ch["cost_per_million"], f" {cur}")),
                 ("cost per month", _with_range(ch.get("cost_per_month"), f" {cur}", digits=5))]
    else:
        rows.append(("cost", "not priced (pass --price-per-hour and --currency to `retool plan`)"))
    res = ch.get("resources") or {}
    if res:
        rows.append(("per replica", f"{_n(res.get('cpu'))} CPU, "
                     + (f"{res['memory_bytes'] / 2**20:.0f} MiB memory" if res.get("memory_bytes") else "memory —")))
    return rows


def others(plan: Mapping) -> tuple[dict | None, list[list[str]], list[list[str]]]:
    """(the runner-up, the other ranked candidates [label, why], the rejected [model, label, reason])."""
    ru = plan.get("runner_up") or None
    ranked = [[r.get("label", ""), r.get("why", "")] for r in plan.get("ranking") or ()
              if not ru or r.get("label") != ru.get("label")]
    rejected = [[r.get("model", ""), r.get("label", ""), r.get("reason", "")] for r in plan.get("rejected") or ()]
    return ru, ranked, rejected


def _curve(plan: Mapping) -> dict | None:
    """The plan's measurements in the load-test report's shape, for retool.serve.plot."""
    ch = plan.get("chosen") or {}
    configs = []
    for c in plan.get("candidates") or ():
        pts = c.get("points") or c.get("probe") or []
        if pts:
            configs.append({"label": f"{c.get('model')} v{c.get('version')}: {c.get('label')}", "points": pts,
                            "best": None, "error": c.get("error")})
    if not configs:
        return None
    rep: dict[str, Any] = {"model": plan.get("family", ""), "version": "", "configs": configs,
                           "budget_p99_ms": (plan.get("inputs") or {}).get("budget_p99_ms"), "chosen": None,
                           "title": f"{plan.get('family', '')}: p99 against throughput per candidate"}
    conf = ch.get("confirmation") or {}
    if conf.get("p99_ms") is not None and conf.get("throughput") is not None:
        rep["chosen"] = {"label": ch.get("label"), "point": {"throughput": conf["throughput"], "p99_ms": conf["p99_ms"],
                                                             "p99_range_ms": conf.get("p99_range_ms")}}
    return rep


# ---- renderers --------------------------------------------------------------------------------------------------
def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _html_table(headers, rows) -> str:
    return ("<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</tbody></table>")


def serving_html(plan: Mapping) -> str:
    from retool.serve.plot import svg

    ch = plan.get("chosen") or {}
    inp = plan.get("inputs") or {}
    rows = facts(plan)
    verdict = ("pass", "PLANNED") if ch else ("fail", "NO PLAN")
    out = [f'<section class="serving"><h2>Serving<span class="verdict {verdict[0]}">{verdict[1]}</span></h2>',
           f'<div class="small muted">{_e(plan.get("family"))}: p99 &lt;= {_e(_n(inp.get("budget_p99_ms")))} ms at '
           f'{_e(_n(inp.get("rate"), 6))} req/s ({_e(inp.get("profile"))}). {_e(plan.get("server"))}</div>']
    if ch:
        conf = ch.get("confirmation") or {}
        cur = ch.get("currency") or inp.get("currency") or ""
        cards = [("chosen variant", f"{ch.get('model')} v{ch.get('version')} ({ch.get('variant')})"),
                 ("configuration", ch.get("label")), ("replicas", ch.get("replicas")),
                 ("p99 at the planned rate", _ms(conf.get("p99_ms", ch.get("p99_ms")))),
                 ("sustainable per replica", f"{_n(_value(ch.get('sustainable_rate'))[0], 4)} req/s")]
        if ch.get("cost_per_million") is not None:
            cards += [("cost per 1M inferences", f"{_n(_value(ch['cost_per_million'])[0], 4)} {cur}"),
                      ("cost per month", f"{_n(_value(ch.get('cost_per_month'))[0], 5)} {cur}")]
        out.append('<div class="cards">' + "".join(f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>'
                                                   for k, v in cards) + "</div>")
    out.append(_html_table(["", "plan"], rows))
    curve = _curve(plan)
    if curve:
        out.append('<div class="plots"><figure><figcaption>p99 against throughput for each candidate; labels are the '
                   'concurrency (cN) or the request rate (/s); the ring is the confirmed choice, its bar the p99 '
                   f'range over the confirmation runs</figcaption>{svg(curve, w=900, h=400)}</figure></div>')
    ru, ranked, rejected = others(plan)
    if ru:
        out.append(f'<h3>Runner-up</h3><p><b>{_e(ru.get("label"))}</b>'
                   + (f" ({_e(ru['replicas'])} replica(s))" if ru.get("replicas") is not None else "")
                   + f": {_e(ru.get('why') or ru.get('reason'))}</p>")
    if ranked:
        out.append("<h3>Also met the budget</h3>" + _html_table(["candidate", "why it was not chosen"], ranked))
    if rejected:
        out.append("<h3>Rejected</h3>" + _html_table(["model", "candidate", "reason"], rejected))
    if plan.get("rule"):
        out.append(f'<p class="small muted">Rule: {_e(plan["rule"])}.</p>')
    out.append("</section>")
    return "".join(out)


def _md_cell(v) -> str:
    return str(v if v is not None else "").replace("|", "\\|").replace("\n", " ")


def serving_markdown(plan: Mapping) -> str:
    inp = plan.get("inputs") or {}
    head = "✅ planned" if plan.get("chosen") else "❌ nothing meets the budget"
    lines = [f"### Serving: {head}", "",
             f"{plan.get('family', '')}: p99 <= {_n(inp.get('budget_p99_ms'))} ms at {_n(inp.get('rate'), 6)} req/s "
             f"({inp.get('profile')}).", "", "| | plan |", "|---|---|"]
    lines += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in facts(plan)]
    ru, ranked, rejected = others(plan)
    if ru:
        lines += ["", f"**Runner-up:** {ru.get('label')}"
                  + (f" ({ru['replicas']} replica(s))" if ru.get("replicas") is not None else "")
                  + f": {ru.get('why') or ru.get('reason')}"]
    if ranked or rejected:
        lines += ["", f"<details><summary>{len(ranked)} other feasible, {len(rejected)} rejected</summary>", "",
                  "| candidate | outcome |", "|---|---|"]
        lines += [f"| {_md_cell(label)} | {_md_cell(why)} |" for label, why in ranked]
        lines += [f"| {_md_cell(label)} | rejected: {_md_cell(reason)} |" for _, label, reason in rejected]
        lines += ["", "</details>"]
    if plan.get("rule"):
        lines += ["", f"<sub>Rule: {plan['rule']}. {plan.get('server', '')}</sub>"]
    return "\n".join(lines)
