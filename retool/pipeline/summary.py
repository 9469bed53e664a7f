"""summary.md: one table that suits a CI job summary (GitHub Actions $GITHUB_STEP_SUMMARY)."""
from __future__ import annotations

from retool.errors import EXIT_CODES

_ICON = {"ok": "✅", "cached": "♻️", "failed": "❌", "skipped": "⏭️"}


def _num(v, fmt="{:.3g}"):
    return "" if v is None else fmt.format(v)


def _batch(nums) -> str:
    b = nums.get("batch")
    if b is None:
        return ""
    n = nums.get("batches") or 1
    return f"{b} (worst of {n})" if n > 1 else str(b)


def _speed(nums) -> str:
    from retool.speed import format_entry

    e = nums.get("speedup_stats") or nums.get("speedup")
    if e is None:
        return ""
    txt = format_entry(e)
    return txt + (" (measured on CPU, not the target's hardware)" if nums.get("off_target") else "")


def render_summary(models, converts, outcomes, code, seconds, engine="local", workers=1) -> str:
    lines = [f"# retool run: {'passed' if code == 0 else 'FAILED'} (exit {code}: {EXIT_CODES.get(code, '')})", "",
             f"{len(models)} model(s), {len(outcomes)} target(s), {seconds:.1f} s, engine {engine}"
             + (f", {workers} worker(s)." if engine == "local" else "."), ""]
    if workers > 1 or engine != "local":
        # parallel jobs share the CPUs, so their timings disturb each other
        lines += ["Latency was measured while jobs ran in parallel: compare ratios, not absolute times, "
                  "or re-run with `--workers 1`.", ""]
    lines += ["Latency and speed-up are at each target's worst batch size (lowest speed-up); speed-up is "
              "fp32 p50 / candidate p50 with the IQR of the paired per-round ratios.", "",
              "| model | target | result | batch | p50 ms | p99 ms | speed-up vs fp32 | size MB | published | note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        val = (o.stages or {}).get("validate", {})
        nums = val.get("summary") or {}
        pub = o.published or {}
        pub_txt = (f"{pub.get('name')} v{pub.get('version')}" + (f" ({pub['alias']})" if pub.get("alias") else "")
                   if pub.get("status") == "ok" else pub.get("message", ""))
        note = o.message.replace("|", "\\|")[:200]
        lines.append(f"| {o.model} | {o.target} | {_ICON.get(o.status, '')} {o.status} | {_batch(nums)} | "
                     f"{_num(nums.get('p50_ms'))} | {_num(nums.get('p99_ms'))} | {_speed(nums)} | "
                     f"{_num(nums.get('size_mb'))} | {pub_txt} | {note} |")
    failed_conv = {n: c for n, c in converts.items() if c.get("status") == "failed"}
    if failed_conv:
        lines += ["", "## Conversion failures", ""]
        lines += [f"- **{n}** (exit {c.get('code')}): {c.get('message')}" for n, c in failed_conv.items()]
    return "\n".join(lines) + "\n"
