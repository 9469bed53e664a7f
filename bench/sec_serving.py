"""Bench section ``serving``: the ResNet-18-sized CNN in a real Triton, fp32 against int8.

For each precision: single-stream throughput (1 instance, no batching, concurrency 1), the
throughput at a fixed p99 budget of the default configuration (1 instance, no batching), and of
the configuration the budget search picks (instances x threads x dynamic batching). The search
runs once; the default and the chosen configuration are then measured again in alternating
rounds, and the ratio tuned/default is reported as the median of the per-round ratios with its
spread. Goal (issue 12): tuned >= 1.8x default at the same budget.

Serving goes through retool's Python-based stand-in for Triton's C++ onnxruntime backend
(docs/serving.md): absolute figures are lower than with the C++ backend; the ratios are the point.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from bench.proc import retool_cmd, run_child
from bench.stats import ratio_summary, summarize

BUDGET_P99_MS = 50.0
SOURCE = "fixtures.torch_models:resnet18_like"
GOAL = 1.8


def _run(args, timeout=1800) -> tuple[bool, str]:
    r = run_child(retool_cmd() + [str(a) for a in args], timeout=timeout)
    return r.ok, (r.stderr.strip().splitlines() or [""])[-1]


def _prepare(work: Path) -> dict:
    """fp32 by retool convert, int8 by retool optimize (cpu-int8), both published (max batch 8)."""
    work.mkdir(parents=True, exist_ok=True)
    fp32, int8, repo = work / "resnet18.onnx", work / "resnet18-int8.onnx", work / "repo"
    steps = [["convert", SOURCE, "-o", fp32],
             ["optimize", fp32, "--target", "cpu-int8", "-o", int8],
             ["publish", fp32, "--repo", repo, "--name", "resnet18-fp32", "--max-batch-size", "8",
              "--max-regression", "off"],
             ["publish", int8, "--repo", repo, "--name", "resnet18-int8", "--max-batch-size", "8",
              "--max-regression", "off"]]
    for s in steps:
        ok, why = _run(s)
        if not ok:
            return {"status": "error", "reason": f"retool {s[0]}: {why}"}
    return {"status": "ok", "repo": str(repo)}


def _at_budget(sess, repo, name, cfg, conc, window, budget):
    from retool.serve.loadtest import LoadSpec
    from retool.serve.tune import tune

    rep = tune(sess, repo, name, LoadSpec(budget_p99_ms=budget, concurrency=tuple(conc), window_ms=window),
               configs=[cfg])
    best = rep["configs"][0]["best"]
    return (best or {}).get("throughput", 0.0), rep["configs"][0]


def serving(settings: dict, work: Path) -> dict:
    try:
        from retool.publish import open_repo
        from retool.serve.loadtest import LoadSpec
        from retool.serve.session import open_session
        from retool.serve.tune import DEFAULT, tune
    except ImportError as exc:
        return {"status": "skipped", "reason": f"retool[serve] not installed: {exc}"}
    quick = settings.get("quick")
    window = 800 if quick else 1500
    rounds = 1 if quick else 3
    conc = (1, 2, 4, 8)
    prep = _prepare(work)
    if prep["status"] != "ok":
        return prep
    repo = open_repo(prep["repo"])
    out: dict = {"budget_p99_ms": BUDGET_P99_MS, "window_ms": window, "rounds": rounds, "goal_ratio": GOAL,
                 "backend": "retool's Python-based onnxruntime backend in Triton 2.51 (stand-in for the C++ one)",
                 "precisions": {}}
    try:
        with open_session(prep["repo"]) as sess:
            out["server"] = sess.backend_note
            budget = BUDGET_P99_MS
            singles = {}
            for prec in ("fp32", "int8"):
                singles[prec] = _at_budget(sess, repo, f"resnet18-{prec}", DEFAULT, (1,), window, None)
            slowest = max((c["best"] or {}).get("p99_ms", 0.0) for _, c in singles.values())
            if slowest * 2 > budget:
                # a slow (or busy) machine: the same budget for every variant, but one the default can meet
                budget = float(10 * -(-int(slowest * 2) // 10))
                out["budget_note"] = (f"raised from {BUDGET_P99_MS:g} ms: single-stream p99 here is {slowest:.0f} ms "
                                      f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
            out["budget_p99_ms"] = budget
            for prec in ("fp32", "int8"):
                name = f"resnet18-{prec}"
                single = singles[prec][0]
                search = tune(sess, repo, name, LoadSpec(budget_p99_ms=budget, space="quick",
                                                         concurrency=tuple(conc), window_ms=window))
                res = {"single_stream": summarize([single], unit="infer/s", better="higher"),
                       "search": [{"label": c["label"], "best": c["best"]} for c in search["configs"]],
                       "chosen": (search.get("chosen") or {}).get("label")}
                if not search.get("chosen"):
                    res["status"] = "budget not met"
                    res["closest"] = search.get("closest")
                    out["precisions"][prec] = res
                    continue
                from retool.serve.profile import ServingConfig

                chosen = ServingConfig.from_dict(search["chosen"]["config"])
                d_tp, t_tp = [], []
                for i in range(rounds):  # alternate which goes first: drift hits both alike
                    pair = [("d", DEFAULT), ("t", chosen)] if i % 2 == 0 else [("t", chosen), ("d", DEFAULT)]
                    for tag, cfg in pair:
                        tp, _ = _at_budget(sess, repo, name, cfg, conc, window, budget)
                        (d_tp if tag == "d" else t_tp).append(tp)
                res["default_at_budget"] = summarize(d_tp, unit="infer/s", better="higher")
                res["tuned_at_budget"] = summarize(t_tp, unit="infer/s", better="higher")
                if all(d_tp):
                    res["tuned_vs_default"] = ratio_summary(t_tp, d_tp, better="higher")
                    res["meets_goal"] = res["tuned_vs_default"]["median"] >= GOAL
                if single:
                    res["tuned_vs_single_stream"] = round(res["tuned_at_budget"]["median"] / single, 3)
                    res["default_vs_single_stream"] = round(res["default_at_budget"]["median"] / single, 3)
                out["precisions"][prec] = res
    except Exception as exc:  # noqa: BLE001 - one section's failure must not stop the others
        from retool.errors import RetoolError

        if not isinstance(exc, RetoolError):
            raise
        return {**out, "status": "error", "reason": str(exc)}
    return out


def render(d: dict) -> str:
    lines = [f"budget p99 <= {d.get('budget_p99_ms')} ms{' (' + d['budget_note'] + ')' if d.get('budget_note') else ''}, "
             f"{d.get('window_ms')} ms windows, {d.get('rounds')} round(s); {d.get('backend')}",
             f"{'precision':<10}{'single':>9}{'default@budget':>16}{'tuned@budget':>14}{'tuned/default':>22}"
             f"{'tuned/single':>14}  chosen"]
    for prec, r in (d.get("precisions") or {}).items():
        def med(k):
            m = r.get(k) or {}
            return f"{m['median']:.0f}" if "median" in m else "-"

        rat = r.get("tuned_vs_default")
        if rat and rat["n"] > 1 and rat["min"] <= 1.0 <= rat["max"]:
            rtxt = "no measurable difference"
        else:
            rtxt = f"{rat['median']:.2f}x [{rat['min']:.2f}-{rat['max']:.2f}]" if rat else r.get("status", "-")
        lines.append(f"{prec:<10}{med('single_stream'):>9}{med('default_at_budget'):>16}{med('tuned_at_budget'):>14}"
                     f"{rtxt:>22}{r.get('tuned_vs_single_stream', '-')!s:>14}  {r.get('chosen')}")
    return "\n".join(lines)


if __name__ == "__main__":  # python bench/sec_serving.py WORKDIR [--quick]: this section alone
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    res = serving({"quick": "--quick" in sys.argv}, Path(sys.argv[1]))
    print(json.dumps(res, indent=1))
    print(render(res))
