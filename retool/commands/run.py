"""retool run."""
from __future__ import annotations


import click

from retool.commands.common import WORKERS


@click.command("run")
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option("--only", help="Run only these targets (comma-separated).")
@click.option("--out", default="retool-out", show_default=True, help="Output folder: artifacts, reports, summary.md.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--ray-address", help="Address of an existing Ray cluster (ray.init(address=...)).")
@click.option("--workers", type=WORKERS, default=1, show_default=True, help="Parallel jobs (model x target).")
@click.option("--fail-fast", is_flag=True, help="Stop everything at the first failure.")
@click.option("--no-cache", is_flag=True, help="Re-run every step even if its inputs did not change.")
@click.option("--json", "as_json", is_flag=True, help="Print summary.json instead of summary.md.")
def run_cmd(pipeline_file, only, out, engine, ray_address, workers, fail_fast, no_cache, as_json):
    """Run PIPELINE_FILE: convert each model once, then optimise, validate and publish per target.

    Exit code: the worst outcome (6 when a gate failed, 4 when a conversion failed ...).
    """
    from retool.pipeline.config import load_config
    from retool.pipeline.runner import run

    cfg = load_config(pipeline_file)  # schema errors exit 2 before any work starts
    result = run(cfg, out=out, only=only, engine=engine, workers=workers, ray_address=ray_address,
                 fail_fast=fail_fast, use_cache=not no_cache)
    click.echo(result.summary_json.read_text() if as_json else result.summary_md.read_text())
    if result.exit_code:
        raise click.exceptions.Exit(result.exit_code)
