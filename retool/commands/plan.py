"""retool plan: which variant, which Triton configuration, how many replicas, at what cost, for a budget and a rate."""
from __future__ import annotations

import json
from pathlib import Path

import click

from retool.publish.signing import require_signed, sign_options, trust_options

from retool.commands.common import CORES, COST_PER_HOUR, HEADROOM, MILLISECONDS, RATE, Number


@click.command("plan")
@click.argument("repo_url", metavar="REPO")
@click.argument("name")
@click.option("--budget-p99-ms", type=MILLISECONDS, required=True, help="The application's latency budget: client p99, "
                                                                 "queue time included.")
@click.option("--rate", type=RATE, required=True, help="Peak traffic the deployment must hold, requests/s.")
@click.option("--profile", type=click.Choice(["realtime", "throughput"]), default="realtime", show_default=True,
              help="realtime: the lowest p99 that holds the rate; throughput: the highest rate per replica, "
                   "batch sizes included.")
@click.option("--price-per-hour", type=COST_PER_HOUR, help="Price of one replica's machine per hour.")
@click.option("--currency", default="USD", show_default=True, help="Currency of --price-per-hour.")
@click.option("--cores-per-replica", type=CORES, help="Cores of one replica (default: this machine's); the server "
                                                    "is pinned to them while measuring.")
@click.option("--headroom", type=HEADROOM, default=0.7, show_default=True,
              help="Fraction of a replica's sustainable rate the plan may use (the rest absorbs bursts).")
@click.option("--space", type=click.Choice(["small", "quick", "full"]), default="small", show_default=True,
              help="How many configurations each variant is measured with.")
@click.option("--window-ms", type=Number(int, 200, 60000), default=1000, show_default=True, help="perf_analyzer measurement window.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Folder for plan.json and plan.md "
                                                                          "(default: plan-NAME).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="A report.json from retool validate: the plan becomes its Serving section (JSON, Markdown, HTML).")
@click.option("--apply", "apply_", is_flag=True, help="Serve the chosen variant with the chosen configuration: a "
                                                        "config revision (retool repo configure), no new version.")
@click.option("--json", "as_json", is_flag=True)
@trust_options
@sign_options
def plan_cmd(repo_url, name, budget_p99_ms, rate, profile, price_per_hour, currency, cores_per_replica, headroom,
             space, window_ms, out_dir, report_path, apply_, as_json, require_signature, trust_key, sign_key,
             sign_cert):
    """Plan how to serve NAME's family from REPO within a p99 budget at a peak rate; exit 6 when nothing can."""
    from retool.errors import UsageError, ValidationFailed
    from retool.fsutil import atomic_write_text
    from retool.publish import open_repo
    from retool.serve import plan as pl
    from retool.serve.planner import run
    from retool.serve.server import install_signal_handlers
    from retool.serve.tune import cores
    from retool.types import jsonable

    here = cores()
    c = here if cores_per_replica is None else cores_per_replica
    if c > here:
        raise UsageError(f"--cores-per-replica {c}: between 1 and this machine's {here} cores (a replica is "
                         f"measured here, pinned to its cores); run the plan on a machine of the replica's size")
    if not currency or not currency.replace("-", "").isalnum() or len(currency) > 8:
        raise UsageError(f"--currency {currency!r}: a currency code such as USD or EUR")
    out = Path(out_dir or f"plan-{name}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder; choose another")
    if report_path and not Path(report_path).is_file():
        raise UsageError(f"--report {report_path}: no such file; give the report.json that retool validate wrote")
    repo = open_repo(repo_url)
    repo.require_model(name)  # before a server starts: an unknown model is a usage error
    require_signed(repo_url, (), trust_key, require_signature)  # the family may span models: all of them
    install_signal_handlers()
    inp = pl.PlanInputs(budget_p99_ms, rate, price_per_hour, currency.upper(), c, headroom, profile, window_ms, space)
    result = run(repo_url, name, inp)
    if result.get("chosen"):  # the signer of what the plan serves, for plan.json and the report's Serving section
        from retool.publish.signing import describe

        result["chosen"]["signature"] = describe(repo_url, result["chosen"]["model"], result["chosen"]["version"],
                                                 bool(trust_key))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "plan.json", json.dumps(jsonable(result), indent=2) + "\n")
    atomic_write_text(out / "plan.md", pl.markdown(result) + "\n")
    if report_path:
        from retool.validators.report_serving import attach_serving

        attach_serving(report_path, result)
    applied = None
    if apply_ and not pl.failure(result):
        from retool.publish.signing import signer

        applied = _apply(open_repo(repo_url, signer=signer(sign_key, sign_cert)) if sign_key else repo, result)
    if as_json:
        click.echo(json.dumps(jsonable(result), indent=2))
    else:
        click.echo(pl.markdown(result))
        click.echo(pl.verdict(result))
        click.echo(f"plan: {out / 'plan.json'}")
        if applied:
            click.echo(applied)
    why = pl.failure(result)
    if why:
        raise ValidationFailed(why)


def _apply(repo, plan: dict) -> str:
    """The chosen configuration as a config revision of the chosen model (nothing when it is served already)."""
    from retool.serve.profile import ServingConfig, ServingProfile

    ch = plan["chosen"]
    cfg = ServingConfig.from_dict(ch["config"])
    if repo.serving_config(ch["model"]) == cfg:
        return f"{ch['model']}: already served with {ch['label']}; nothing to apply"
    meas = {"plan": {k: plan["inputs"][k] for k in ("budget_p99_ms", "rate", "profile", "cores_per_replica")},
            "sustainable_rate": ch["sustainable_rate"], "replicas": ch["replicas"], "p99_ms": ch.get("p99_ms"),
            "queue_ms": ch.get("queue_ms"), "compute_ms": ch.get("compute_ms")}
    repo.configure(ch["model"], ServingProfile(ch["model"], cfg, meas), ch["version"])
    return f"{ch['model']}: config revision applied ({ch['label']}); version {ch['version']} unchanged"
