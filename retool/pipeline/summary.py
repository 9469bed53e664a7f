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
    """The speed-up as the gate decided it (interval and outcome), else the descriptive figure."""
    from retool.speed import format_decision, format_entry

    d = nums.get("decision")
    e = nums.get("speedup_stats") or nums.get("speedup")
    if d is not None:
        txt = format_decision(d) + f": {d.get('gate', 'gate')} {d['outcome']}"
        if d.get("raw_outcome") == "undecided":
            txt += " (undecided)"
    elif e is None:
        return ""
    else:
        txt = format_entry(e)
    return txt + (" (measured on CPU, not the target's hardware)" if nums.get("off_target") else "")


def serving_seconds(outcomes) -> float:
    """Seconds spent in the serve stage (check, load test, plan) over all targets."""
    return sum(float(((o.stages or {}).get("serve") or {}).get("seconds") or 0.0) for o in outcomes)


def busy_line(outcomes) -> str | None:
    """One line when any target's figures were taken on a busy machine (retool.machine)."""
    busy = [f"{o.model}/{o.target}" for o in outcomes
            if (((o.stages or {}).get("validate") or {}).get("summary") or {}).get("machine_busy")]
    if not busy:
        return None
    return (f"⚠️ Timed on a busy machine (load above its cores): {', '.join(busy)}. Rerun on a quiet machine, "
            f"or pin threads (`taskset`, `--threads 1`); decisions used intervals, and undecided ones say so.")


def render_summary(models, converts, outcomes, code, seconds, engine="local", workers=1) -> str:
    serve_s = serving_seconds(outcomes)
    lines = [f"# retool run: {'passed' if code == 0 else 'FAILED'} (exit {code}: {EXIT_CODES.get(code, '')})", "",
             f"{len(models)} model(s), {len(outcomes)} target(s), {seconds:.1f} s"
             + (f" (serving {serve_s:.1f} s)" if serve_s else "") + f", engine {engine}"
             + (f", {workers} worker(s)." if engine == "local" else "."), ""]
    busy = busy_line(outcomes)
    if busy:
        lines += [busy, ""]
    if workers > 1 or engine != "local":
        # parallel jobs share the CPUs, so their timings disturb each other
        lines += ["Latency was measured while jobs ran in parallel: compare ratios, not absolute times, "
                  "or re-run with `--workers 1`.", ""]
    lines += ["Latency and speed-up are at each target's worst batch size (lowest speed-up); speed-up is "
              "fp32 p50 / candidate p50 with the 95% paired bootstrap interval its gate decided on "
              "(pass, fail, or undecided: docs/validate.md).", "",
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
