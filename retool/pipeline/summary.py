"""summary.md: one table that suits a CI job summary (GitHub Actions $GITHUB_STEP_SUMMARY)."""
from __future__ import annotations

from retool.errors import EXIT_CODES

_ICON = {"ok": "✅", "cached": "♻️", "failed": "❌", "skipped": "⏭️"}


def _num(v, fmt="{:.3g}"):
    return "" if v is None else fmt.format(v)


def render_summary(models, converts, outcomes, code, seconds, engine="local", workers=1) -> str:
    lines = [f"# retool run: {'passed' if code == 0 else 'FAILED'} (exit {code}: {EXIT_CODES.get(code, '')})", "",
             f"{len(models)} model(s), {len(outcomes)} target(s), {seconds:.1f} s, engine {engine}"
             + (f", {workers} worker(s)." if engine == "local" else "."), ""]
    if workers > 1 or engine != "local":
        # parallel jobs share the CPUs, so their timings disturb each other
        lines += ["Latency was measured while jobs ran in parallel: compare ratios, not absolute times, "
                  "or re-run with `--workers 1`.", ""]
    lines += ["| model | target | result | p50 ms | p99 ms | speedup vs fp32 | size MB | published | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        val = (o.stages or {}).get("validate", {})
        nums = val.get("summary") or {}
        pub = o.published or {}
        pub_txt = (f"{pub.get('name')} v{pub.get('version')}" + (f" ({pub['alias']})" if pub.get("alias") else "")
                   if pub.get("status") == "ok" else pub.get("message", ""))
        note = o.message.replace("|", "\\|")[:200]
        lines.append(f"| {o.model} | {o.target} | {_ICON.get(o.status, '')} {o.status} | {_num(nums.get('p50_ms'))} | "
                     f"{_num(nums.get('p99_ms'))} | {_num(nums.get('speedup'), '{:.2f}×')} | "
                     f"{_num(nums.get('size_mb'))} | {pub_txt} | {note} |")
    failed_conv = {n: c for n, c in converts.items() if c.get("status") == "failed"}
    if failed_conv:
        lines += ["", "## Conversion failures", ""]
        lines += [f"- **{n}** (exit {c.get('code')}): {c.get('message')}" for n, c in failed_conv.items()]
    return "\n".join(lines) + "\n"
