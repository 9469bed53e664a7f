"""Helpers shared by the subcommands."""
from __future__ import annotations


import click

from retool.types import Report


def emit_report(report: Report, as_json: bool, human: str) -> None:
    """JSON report on stdout with --json, else the human table."""
    if as_json:
        click.echo(report.to_json())
    else:
        click.echo(human)


def parse_csv_ints(text: str | None, flag: str) -> list[int] | None:
    from retool.errors import UsageError

    if not text:
        return None
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers such as 1,8,32") from None
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"{flag} {text!r}: expected positive integers")
    return vals
