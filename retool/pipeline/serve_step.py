"""The pipeline's ``serve:`` step, after every job has finished (measurements need the CPUs alone).

For each published target with a ``serve:`` section: load it in a real Triton and prove parity
with its samples (check), load-test it, and with ``budget_p99_ms`` pick its configuration; a
budget that no configuration meets fails the step's gate (exit 6). A chosen profile is applied to
the published version (NAME/serving.json and config.pbtxt; the manifest stays as published).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from retool import console
from retool.errors import ModelLoadError, RetoolError


def _wanted(cfg: Mapping) -> bool:
    return bool(cfg) and (cfg.get("check", True) or cfg.get("load") or cfg.get("budget_p99_ms") is not None)


def serve_one(sess, repo, name: str, version: int, cfg: Mapping, out_dir: Path) -> dict[str, Any]:
    from retool.serve import plot
    from retool.serve.check import check_one
    from retool.serve.loadtest import LoadSpec
    from retool.serve.profile import ServingConfig, ServingProfile
    from retool.serve.tune import measurement, tune, verdict

    t0 = time.perf_counter()
    res: dict[str, Any] = {"stage": "serve", "status": "ok", "code": 0, "message": "", "server": sess.backend_note}
    try:
        if cfg.get("check", True):
            chk = check_one(sess, repo, name, version)
            par = chk.get("parity") or []
            res["check"] = {"passed": chk["passed"], "ready": chk["ready"], "config": chk["config"],
                            "parity": [{k: p.get(k) for k in ("protocol", "batch", "passed", "max_abs", "min_cosine")}
                                       for p in par], "note": chk.get("note")}
            gen = chk.get("generation")
            if gen:  # a decoder: its greedy generation through the server
                res["check"]["generation"] = [{k: p.get(k) for k in ("protocol", "passed", "steps", "agreement",
                                                                     "first_divergence", "min_cosine", "max_logit_diff",
                                                                     "teacher_forced")}
                                              for p in gen["protocols"]]
            if not chk["passed"]:
                from retool.serve.decoder import failure

                why = failure(gen) if gen else None
                res.update(status="failed", code=6, message=f"{name} v{version}: " + (
                    why or "Triton's answers differ from the published samples"))
                return res
        budget = cfg.get("budget_p99_ms")
        if cfg.get("load") or budget is not None:
            rate = cfg.get("rate")
            spec = LoadSpec(budget_p99_ms=budget, rate=rate,
                            rates=() if budget is not None or not rate else (rate,),
                            concurrency=tuple(cfg.get("concurrency") or (1, 2, 4, 8)),
                            window_ms=int(cfg.get("window_ms", 1000)), space=cfg.get("space", "small"),
                            price_per_hour=cfg.get("cost_per_hour"), currency=str(cfg.get("currency") or "USD").upper())
            rep = tune(sess, repo, name, spec, configs=None if budget is not None else "published")
            out_dir.mkdir(parents=True, exist_ok=True)
            from retool.fsutil import atomic_write_text
            from retool.types import jsonable

            atomic_write_text(out_dir / "report.json", json.dumps(jsonable(rep), indent=2) + "\n")
            atomic_write_text(out_dir / "plot.svg", plot.svg(rep))
            atomic_write_text(out_dir / "table.md", plot.markdown(rep) + "\n")
            ch = rep.get("chosen")
            res["load"] = {"report": str(out_dir / "report.json"), "plot": str(out_dir / "plot.svg"),
                           "met": rep["met"], "verdict": verdict(rep), "budget_p99_ms": budget, "rate": rate,
                           "chosen": ({"label": ch["label"], "config": ch["config"], **{
                               k: ch["point"][k] for k in ("throughput", "p50_ms", "p99_ms", "queue_ms", "compute_ms")},
                               "load": ch["point"]["load"], "cost_per_million": ch.get("cost_per_million"),
                               "throughput_vs_default": ch.get("throughput_vs_default")} if ch else None),
                           "closest": rep.get("closest"), "currency": rep.get("currency")}
            if budget is not None and not ch:
                res.update(status="failed", code=6, message=verdict(rep))
            elif budget is not None and ch["config"] == rep.get("published"):
                # the published configuration stays (best, or not beaten beyond the noise): nothing to rewrite
                res["load"]["kept_published"] = True
            elif budget is not None:
                prof = ServingProfile(name, ServingConfig.from_dict(ch["config"]), measurement(rep))
                repo.set_serving_profile(name, version, prof)
                sess.load(name)  # the config as now written must load too
                res["load"]["profile_applied"] = str(repo.storage.location(f"{name}/serving.json"))
    except ModelLoadError as exc:
        res.update(status="failed", code=exc.exit_code, message=str(exc))
    except RetoolError as exc:
        res.update(status="failed", code=exc.exit_code, message=str(exc))
    finally:
        res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def serve_published(models: Sequence, outcomes: list, out_dir: Path) -> list:
    """The outcomes, with a ``serve`` stage for each published target that asks for one."""
    from retool.publish import open_repo
    from retool.serve.session import open_session

    by_model = {m.name: m for m in models}
    todo: dict[tuple[str, str | None], list[int]] = {}
    for i, o in enumerate(outcomes):
        m = by_model.get(o.model)
        t = next((t for t in (m.targets if m else ()) if t.name == o.target), None)
        pub = o.published or {}
        if t is None or not _wanted(t.serve) or pub.get("status") != "ok" or o.status == "failed":
            continue
        todo.setdefault((pub["repository"], t.serve.get("url")), []).append(i)
    if not todo:
        return outcomes
    out = list(outcomes)
    for (repo_url, url), idxs in todo.items():
        repo = open_repo(repo_url)
        try:
            with open_session(repo_url, url=url) as sess:
                for i in idxs:
                    o = out[i]
                    t = next(t for t in by_model[o.model].targets if t.name == o.target)
                    name, version = o.published["name"], int(o.published["version"])
                    from retool.publish.signing import signer  # a signed model's config revision is signed too

                    repo.signer = signer(**(o.published.get("signing") or {}))
                    console.info(f"• {o.model}/{o.target}: serving {name} v{version} in Triton")
                    with console.labelled(f"{o.model}/{o.target}"):
                        res = serve_one(sess, repo, name, version, t.serve, out_dir / o.model / o.target / "serve")
                    out[i] = _with(o, res)
        except RetoolError as exc:  # the server itself failed: every target of this repository says so
            for i in idxs:
                if "serve" not in (out[i].stages or {}):
                    out[i] = _with(out[i], {"stage": "serve", "status": "failed", "code": exc.exit_code,
                                            "message": str(exc)})
    return out


def _with(o, res: dict):
    stages = {**(o.stages or {}), "serve": res}
    if res["status"] == "failed":
        return dataclasses.replace(o, stages=stages, status="failed", code=res["code"], message=res["message"])
    return dataclasses.replace(o, stages=stages)


def summary_section(outcomes: Sequence) -> str:
    """summary.md's serving lines: parity through the server, and the budget line per model."""
    rows = [(o, (o.stages or {}).get("serve")) for o in outcomes if (o.stages or {}).get("serve")]
    if not rows:
        return ""
    lines = ["", "## Serving in a real Triton", "",
             "| model | target | served as | parity through Triton (http, grpc) | budget | throughput | p99 ms | "
             "configuration | cost / 1M |", "|---|---|---|---|---|---|---|---|---|"]
    note = ""
    for o, s in rows:
        note = note or s.get("server", "")
        chk = s.get("check") or {}
        par = chk.get("parity") or []
        worst = max((p.get("max_abs") or 0.0 for p in par), default=None)
        ptxt = (("✅" if chk.get("passed") else "❌") + f" max diff {worst:.1e} over {len(par)} requests"
                if par else (chk.get("note") or ""))
        load = s.get("load") or {}
        ch = load.get("chosen") or {}
        budget = load.get("budget_p99_ms")
        cost = ch.get("cost_per_million")
        if s.get("status") == "failed" and not ch:
            conf = s.get("message", "").replace("|", "\\|")[:200]
        else:
            conf = ch.get("label", "")
        pub = o.published or {}
        btxt = "" if budget is None else f"p99 ≤ {budget:g} ms"
        tput = f"{ch['throughput']:.0f}/s" if ch else ""
        p99 = f"{ch['p99_ms']:.2f}" if ch else ""
        ctxt = "" if cost is None else f"{cost:.3g} {load.get('currency') or 'USD'}"
        lines.append(f"| {o.model} | {o.target} | {pub.get('name')} v{pub.get('version')} | {ptxt} | {btxt} | "
                     f"{tput} | {p99} | {conf} | {ctxt} |")
    if note:
        lines += ["", f"Server: {note}."]
    return "\n".join(lines) + "\n"


def plan_models(models: Sequence, outcomes: Sequence, out_dir: Path) -> list[dict]:
    """The serving plan of each model with a ``plan:`` section, over its published family (after serve)."""
    from retool.fsutil import atomic_write_text, inside
    from retool.serve import plan as pl
    from retool.serve.planner import run
    from retool.serve.tune import cores
    from retool.types import jsonable

    out = []
    for m in models:
        if not m.plan:
            continue
        pub = next((o.published for o in outcomes if o.model == m.name and (o.published or {}).get("status") == "ok"),
                   None)
        res: dict[str, Any] = {"model": m.name, "status": "ok", "code": 0, "message": ""}
        out.append(res)
        if pub is None:
            res.update(status="skipped", message="no target of this model was published")
            continue
        p = dict(m.plan)
        n = int(p.get("cores_per_replica") or cores())
        if n > cores():  # as the CLI says it: a replica larger than this machine cannot be measured here
            res.update(status="failed", code=2, message=f"{m.name}: plan.cores_per_replica {n}: this machine has "
                                                        f"{cores()} cores; plan on a machine of the replica's size")
            continue
        inp = pl.PlanInputs(float(p["budget_p99_ms"]), float(p["rate"]), p.get("price_per_hour"),
                            str(p.get("currency") or "USD").upper(), n, float(p.get("headroom", 0.7)),
                            p.get("profile", "realtime"), int(p.get("window_ms", 1000)), p.get("space", "small"))
        console.info(f"• {m.name}: serving plan for p99 <= {inp.budget_p99_ms:g} ms at {inp.rate:g} req/s")
        t0 = time.perf_counter()
        try:
            plan = run(pub["repository"], pub["name"], inp)
        except RetoolError as exc:
            res.update(status="failed", code=exc.exit_code, message=str(exc), seconds=round(time.perf_counter() - t0, 2))
            continue
        folder = inside(out_dir, f"{m.name}/plan")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "plan.json", json.dumps(jsonable(plan), indent=2) + "\n")
        atomic_write_text(folder / "plan.md", pl.markdown(plan) + "\n")
        res.update(plan=str(folder / "plan.json"), verdict=pl.verdict(plan), seconds=round(time.perf_counter() - t0, 2),
                   chosen=plan.get("chosen"), inputs=plan["inputs"])
        res["report"] = _attach(outcomes, m.name, plan)
        why = pl.failure(plan)
        if why:
            res.update(status="failed", code=6, message=why)
    return out


def _attach(outcomes: Sequence, model: str, plan: dict) -> str | None:
    """The plan goes into the readiness report of the target it chose (its Serving section)."""
    from retool.validators.report_serving import attach_serving

    chosen = (plan.get("chosen") or {}).get("model")
    for o in outcomes:
        rep = ((o.stages or {}).get("validate") or {}).get("report")
        if o.model == model and (o.published or {}).get("name") == chosen and rep:
            try:
                return str(attach_serving(rep, plan)["html"])
            except RetoolError as exc:  # the plan stands on its own; the report keeps what it had
                console.warn(f"{model}: the plan could not be added to {rep} ({exc})")
    return None


def plan_section(plans: Sequence[Mapping]) -> str:
    """summary.md's serving-plan lines: one per model with a plan."""
    if not plans:
        return ""
    lines = ["", "## Serving plan", ""]
    for r in plans:
        if r["status"] == "skipped":
            lines.append(f"- {r['model']}: no plan ({r['message']})")
            continue
        mark = "✅" if r["status"] == "ok" else "❌"
        lines.append(f"- {mark} {r.get('verdict') or r['message']}" + (f" ([plan]({r['plan']}))" if r.get("plan") else ""))
    return "\n".join(lines) + "\n"
