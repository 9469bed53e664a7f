"""The manifest beside every published model: what the files are, where they came from, who put them there."""
from __future__ import annotations

import getpass
import os
import platform
import socket
from typing import Mapping, Sequence

from retool.types import ModelArtifact, Report, jsonable, now_iso

MANIFEST_SCHEMA_VERSION = "1.0"
_CI_VARS = ("GITHUB_ACTOR", "GITHUB_RUN_ID", "GITHUB_SHA", "GITLAB_USER_LOGIN", "CI_JOB_ID", "CI_COMMIT_SHA",
            "BUILD_ID", "BUILD_URL")


def publisher() -> dict:
    """Who and where, from the environment (RETOOL_PUBLISHER overrides the login name)."""
    user = os.environ.get("RETOOL_PUBLISHER")
    if not user:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry in some containers
            user = f"uid-{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    out = {"user": user, "host": socket.gethostname(), "pid": os.getpid()}
    ci = {k: os.environ[k] for k in _CI_VARS if os.environ.get(k)}
    if ci:
        out["ci"] = ci
    return out


def provenance_summary(art: ModelArtifact) -> dict:
    """The chain, plus the facts people look for first: source hash, versions, opset, target, calibration."""
    versions: dict[str, str] = {}
    calibration: dict[str, object] = {}
    for step in art.provenance:
        versions.update({k: str(v) for k, v in step.versions.items()})
        for k, v in step.params.items():
            if "calib" in k.lower():
                calibration[k] = v
    first = art.provenance[0] if art.provenance else None
    return {
        "source_sha256": art.source_sha256,
        "source": (first.params.get("source") if first else None),
        "framework": (first.params.get("framework") if first else None),
        "versions": versions,
        "opset": art.opset,
        "target": art.target,
        "precision": art.precision,
        "calibration": jsonable(calibration) or None,
        "chain": [p.to_dict() for p in art.provenance],
    }


def build_manifest(*, name: str, version: int, art: ModelArtifact, files: Mapping[str, Mapping],
                   report: Report | None, report_source: str | None, report_matches: bool | None,
                   forced: bool, forced_reasons: Sequence[str], regression: Sequence, limits: Mapping,
                   baselines: Mapping[str, int], triton: Mapping, published: Mapping | None = None,
                   samples: Mapping | None = None) -> dict:
    from retool import __version__

    art_dict = art.to_dict()
    art_dict["path"] = "model.onnx"
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "name": name,
        "version": version,
        "files": {k: dict(v) for k, v in files.items()},
        "artifact": art_dict,
        "provenance": provenance_summary(art),
        "readiness": {
            "passed": None if report is None else report.passed,
            "stage": None if report is None else report.stage,
            "source": report_source,
            "matches_artifact": report_matches,
            "failed_checks": [] if report is None else [c.name for c in report.failed_checks],
        },
        "report": None if report is None else report.to_dict(),
        "forced": bool(forced),
        "forced_reasons": list(forced_reasons),
        "regression": {"limits": dict(limits), "baselines": dict(baselines),
                       "checks": [c.to_dict() for c in regression]},
        "triton": dict(triton),
        "samples": dict(samples) if samples else None,
        "published": dict(published or {}) or {**publisher(), "at": now_iso()},
        "retool_version": __version__,
        "python": platform.python_version(),
    }
