"""retool loadtest: perf_analyzer against a model in a real Triton; with a p99 budget, pick its configuration."""
from __future__ import annotations

import json
from pathlib import Path

import click

from retool.publish.signing import require_signed, trust_options


def _floats(text, flag):
    from retool.errors import UsageError

    if not text:
        return []
    try:
        vals = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected numbers such as 50,100,200") from None
    if not vals or any(v <= 0 for v in vals):
        raise UsageError(f"{flag} {text!r}: expected positive numbers")
    return vals


@click.command("loadtest")
@click.argument("repo_url", metavar="REPO")
@click.argument("name")
@click.option("--url", help="HTTP URL of a running Triton that serves REPO (default: start the local one).")
@click.option("--grpc-url", help="gRPC address of that Triton (default: its host, port 8001).")
@click.option("--concurrency", default="1,2,4,8", show_default=True, help="Concurrency sweep (comma-separated).")
@click.option("--rate", help="Request-rate sweep in req/s (comma-separated) instead of concurrency; with "
                             "--budget-p99-ms, one rate: the configuration with the lowest p99 at it wins.")
@click.option("--budget-p99-ms", type=float, help="Search instances x threads x batching for the highest throughput "
                                                  "whose client p99 meets this budget; exit 6 when none does.")
@click.option("--space", type=click.Choice(["small", "quick", "full"]), default="quick", show_default=True,
              help="How many configurations the budget search measures.")
@click.option("--window-ms", type=int, default=1500, show_default=True, help="perf_analyzer measurement window.")
@click.option("--cost-per-hour", type=float, help="Price of the serving machine per hour: reports cost per million "
                                                   "inferences at the chosen point.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Folder for report.json, plot.svg and "
                                                                          "table.md (default: loadtest-NAME).")
@click.option("--profile-out", type=click.Path(dir_okay=False),
              help="Write the chosen configuration as a serving profile (for retool publish --serving-profile).")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds for a model to load.")
@click.option("--json", "as_json", is_flag=True)
@trust_options
def loadtest_cmd(repo_url, name, url, grpc_url, concurrency, rate, budget_p99_ms, space, window_ms, cost_per_hour,
                 out_dir, profile_out, timeout, as_json, require_signature, trust_key):
    """Load-test NAME with perf_analyzer; with --budget-p99-ms, choose how to serve it."""
    from retool import console
    from retool.commands.common import parse_csv_ints
    from retool.errors import UsageError, ValidationFailed
    from retool.publish import open_repo
    from retool.serve import plot
    from retool.serve.client import check_url
    from retool.serve.loadtest import LoadSpec
    from retool.serve.server import install_signal_handlers, positive_seconds
    from retool.serve.session import open_session
    from retool.serve.tune import measurement, tune, verdict
    from retool.types import jsonable

    conc = parse_csv_ints(concurrency, "--concurrency") or [1]
    rates = _floats(rate, "--rate")
    if budget_p99_ms is not None and budget_p99_ms <= 0:
        raise UsageError(f"--budget-p99-ms {budget_p99_ms}: a budget is a positive number of milliseconds")
    if budget_p99_ms is not None and len(rates) > 1:
        raise UsageError("--rate with --budget-p99-ms takes one rate (the load the budget must hold at)")
    if window_ms < 200:
        raise UsageError(f"--window-ms {window_ms}: at least 200 ms, or the percentiles mean little")
    timeout = positive_seconds(timeout, "--timeout")
    if url:
        check_url(url)
    spec = LoadSpec(budget_p99_ms=budget_p99_ms, rate=rates[0] if budget_p99_ms is not None and rates else None,
                    rates=() if budget_p99_ms is not None else tuple(rates), concurrency=tuple(conc),
                    window_ms=window_ms, space=space, price_per_hour=cost_per_hour, timeout=timeout)
    install_signal_handlers()
    repo = open_repo(repo_url)
    name = repo.require_model(name)
    require_signed(repo_url, [name], trust_key, require_signature)  # before any server starts
    with open_session(repo_url, url=url, grpc_url=grpc_url) as sess:
        rep = tune(sess, repo, name, spec, configs=None if budget_p99_ms is not None else "published")
    out = Path(out_dir or f"loadtest-{name}")
    out.mkdir(parents=True, exist_ok=True)
    from retool.fsutil import atomic_write_text

    atomic_write_text(out / "report.json", json.dumps(jsonable(rep), indent=2) + "\n")
    atomic_write_text(out / "plot.svg", plot.svg(rep))
    atomic_write_text(out / "table.md", plot.markdown(rep) + "\n")
    if profile_out and rep.get("chosen"):
        from retool.serve.profile import ServingConfig, ServingProfile

        ch = rep["chosen"]
        ServingProfile(name, ServingConfig.from_dict(ch["config"]), measurement=measurement(rep)).save(profile_out)
    if as_json:
        click.echo(json.dumps(jsonable(rep), indent=2))
    else:
        click.echo(console.table(plot.HEADERS, plot.table_rows(rep)))
        click.echo(f"\n{rep['server']}")
        click.echo(verdict(rep))
        click.echo(f"report: {out / 'report.json'}, plot: {out / 'plot.svg'}"
                   + (f", profile: {profile_out}" if profile_out and rep.get("chosen") else ""))
    if budget_p99_ms is not None and not rep.get("chosen"):
        raise ValidationFailed(verdict(rep))

