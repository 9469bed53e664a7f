"""Plain-text tables of a result file's sections (also used by ``bench/compare.py --show``)."""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script (python bench/report.py): the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stats import fmt_metric  # noqa: E402
from retool.console import table  # noqa: E402

MIB = 2**20


def _table(headers: list[str], rows: list[list]) -> str:
    # the product's table; str() first, so figures print as the sections formatted them
    return table(headers, [[str(c) for c in r] for r in rows])


_m = fmt_metric


def _status(d) -> str | None:
    if not isinstance(d, dict):
        return "missing"
    if d.get("status", "ok") != "ok":
        return f"{d['status'].upper()}: {d.get('reason', '')}"[:160]
    return None


def cold_start(d: dict) -> str:
    rows = [[k, _m(v["wall"]), _m(v["wall"].get("min") and {"value": v["wall"]["min"]}), _m(v["peak_rss_mib"], "{:.0f}", spread=False)]
            for k, v in d.get("commands", {}).items()]
    return _table(["command", "wall s median [IQR]", "min s", "peak RSS MiB"], rows)


def models(d: dict) -> str:
    conv, tgt = [], []
    for name, m in d.get("models", {}).items():
        st = _status(m)
        if st:
            conv.append([name, st])
            continue
        c = m.get("convert", {})
        vs = m.get("vs_source", {})
        vb = vs.get("batches", {}) if isinstance(vs, dict) else {}
        ratios = [_m(vb.get(b, {}).get("ort_over_source")) for b in ("1", "8")] if not _status(vs) else [_status(vs)[:60], ""]
        conv.append([name, m.get("framework", ""), _m(c.get("wall"), "{:.1f}"), _m(c.get("peak_rss_mib"), "{:.0f}"),
                     f"{c.get('size_bytes', 0) / 1e6:.2f}", *ratios])
        t = m.get("targets")
        if t is None:
            continue
        st = _status(t)
        if st:
            tgt.append([name, "*", st])
            continue
        for tn, td in t.get("targets", {}).items():
            st = _status(td)
            if st and "latency_vs_fp32" not in td:
                tgt.append([name, tn, st[:120]])
                continue
            lv = td.get("latency_vs_fp32", {})
            p = td.get("parity", {})
            mark = "" if td.get("timed_on_target_hardware", True) else "*"
            tgt.append([name, tn + mark + (f" ({td['chosen']})" if td.get("chosen") else ""), td.get("precision") or "",
                        f"{td.get('size_bytes', 0) / 1e6:.2f}", _m(td.get("size_vs_fp32"), "{:.2f}"),
                        _m(lv.get("1")), _m(lv.get("8")), _m(p.get("cosine_min"), "{:.5f}"),
                        _m(p.get("top1_agreement"), "{:.3f}"), f"{td.get('optimize_s', 0):.1f}"])
    out = [f"threads={d.get('threads')}; ratios are latency / baseline latency (< 1 = faster), median [IQR of per-round ratios]",
           _table(["model", "framework", "convert s", "convert peak RSS MiB", "fp32 MB", "ORT/source b1", "ORT/source b8"], conv)]
    if tgt:
        out.append(_table(["model", "target", "precision", "MB", "size/fp32", "lat/fp32 b1", "lat/fp32 b8",
                           "cosine", "top1", "optimize s"], tgt))
        if any("*" in r[1] for r in tgt):
            out.append("* timed on this machine's CPU, not on the hardware the target is for: "
                       "that latency says nothing about its speed there")
    return "\n\n".join(out)


def large_model(d: dict) -> str:
    head = f"{d.get('model', '')}: {d.get('model_size_bytes', 0) / 1e9:.2f} GB; goal peak RSS <= {d.get('goal_rss_over_size')} x size"
    if d.get("import_floor_rss_bytes"):
        head += f"; import floor {d['import_floor_rss_bytes'] / MIB:.0f} MiB"
    rows = []
    for name, s in (d.get("stages") or {}).items():
        st = _status(s)
        if st:
            rows.append([name, st])
            continue
        rows.append([name, _m(s["wall_s"], "{:.1f}"), f"{s['peak_rss_bytes'] / 2**30:.2f}",
                     _m(s["rss_over_model_size"], "{:.2f}"), "yes" if s.get("meets_goal") else "NO",
                     "-" if s.get("above_floor_over_model_size") is None else f"{s['above_floor_over_model_size']:.2f}"])
    out = head + "\n" + _table(["stage", "wall s", "peak RSS GiB", "RSS/size", "meets goal",
                                 "(RSS-floor)/size"], rows)
    if d.get("signing"):
        out += "\n\nsigning: " + (_status(d["signing"]) or signing(d["signing"]))
    return out


def pipeline(d: dict) -> str:
    rows = [[k, _m(v, "{:.2f}")] for k, v in d.items() if isinstance(v, dict) and ("median" in v or "value" in v)]
    return (f"{d.get('model', '')} -> {d.get('target', '')}; goal ratio ~{d.get('goal_ratio', '')}\n"
            + _table(["figure", "median [IQR]"], rows))


from bench.sec_serving import render as serving  # noqa: E402,F401  (the "serving" section's table)
from bench.sec_plan import render as plan  # noqa: E402,F401  (the "plan" section's lines)
from bench.sec_peers import render_table as peers  # noqa: E402,F401  (globals() lookup by section name)
from bench.sec_decoder import render_decoder as decoder  # noqa: E402,F401  (section "decoder")
from bench.sec_decisions import render as decisions  # noqa: E402,F401  (section "decisions")
from bench.sec_signing import render as signing  # noqa: E402  (section "signing", and large_model's signing)


def render(name: str, d: dict) -> str:
    st = _status(d)
    if st:
        return st
    fn = globals().get(name)
    return fn(d) if fn else ""


def main(argv=None) -> int:
    """``python bench/report.py RESULT.json``: print a result file's tables again."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: bench/report.py RESULT.json", file=sys.stderr)
        return 2
    data = json.loads(open(args[0]).read())
    m = data.get("machine", {})
    print(f"{data.get('started_at')} {'quick' if (data.get('settings') or {}).get('quick') else 'full'} run, "
          f"{m.get('cpu_model')}, {m.get('cpus_usable')} cores, commit {m.get('git_commit')}, {data.get('wall_s')} s")
    for name, sec in (data.get("sections") or {}).items():
        print(f"\n== {name}\n{render(name, sec)}")
        if (sec.get("machine") or {}).get("busy"):
            from retool.machine import describe

            print(describe(sec["machine"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
