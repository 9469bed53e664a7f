"""The readiness report's Serving section: ``attach_serving`` puts a plan (the dict of plan.json) into a
report written by ``retool validate`` and rewrites its three files. The rendering itself is
validators/serving_render.py (``serving_html``/``serving_markdown``, re-exported here)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

from retool.validators.serving_render import PLAN_KIND, serving_html, serving_markdown

__all__ = ["PLAN_KIND", "attach_serving", "serving_html", "serving_markdown"]


# ---- into an existing report ------------------------------------------------------------------------------------
def attach_serving(report_json_path, plan: dict) -> dict[str, Path]:
    """Put ``plan`` under data["serving"] of the report.json that `retool validate` wrote, and rewrite it and its
    report.md/report.html siblings (each atomically). Returns {"json"|"md"|"html": path}."""
    import json

    from retool.errors import UsageError
    from retool.types import Report
    from retool.validators.core import write_reports

    p = Path(report_json_path)
    if p.is_dir():
        p = p / "report.json"
    fix = "pass the report.json that `retool validate --report-dir` wrote"
    if p.name != "report.json":
        raise UsageError(f"--report {p}: not a report.json (its .md and .html siblings are rewritten too); {fix}")
    try:
        report = Report.from_dict(json.loads(p.read_text()))
    except FileNotFoundError:
        raise UsageError(f"--report {p}: no such file; {fix}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"--report {p}: not a readable retool report ({exc}); {fix}") from None
    if report.stage != "validate":
        raise UsageError(f"--report {p}: a report of stage {report.stage!r}, not of `retool validate`; {fix}")
    if not isinstance(plan, Mapping) or plan.get("kind") != PLAN_KIND:
        raise UsageError(f"--report: the plan to attach is not a {PLAN_KIND} (got kind "
                         f"{plan.get('kind') if isinstance(plan, Mapping) else type(plan).__name__!r}); "
                         f"pass the plan that `retool plan` made")
    report = dataclasses.replace(report, data={**report.data, "serving": dict(plan)})
    return write_reports(report, p.parent)
