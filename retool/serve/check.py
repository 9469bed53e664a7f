"""``retool repo check``: does a real Triton load this model, and give the published answers?

Loads each model with explicit model control, reports Triton's verdict (repository index,
readiness, the config as Triton completed it), sends the version's held-out samples over HTTP
and gRPC at batch 1 and at max_batch_size, and compares with the outputs stored at publish time.
"""
from __future__ import annotations

import json
from typing import Any

from retool.errors import ModelLoadError, UsageError, ValidationFailed
from retool.serve import samples as smp
from retool.serve.client import infer
from retool.serve.session import Session, open_session

PROTOCOLS = ("http", "grpc")


def _override_version(repo, name: str, version: int) -> dict | None:
    """config.pbtxt as JSON with version_policy pinned to ``version`` (for a version not served)."""
    from retool.serve.session import published_config

    if repo.config_text(name) is None:
        return None
    cfg = published_config(repo, name)
    cfg["version_policy"] = {"specific": {"versions": [str(int(version))]}}
    return cfg


def completed_config(cfg: dict) -> dict:
    """The parts of Triton's completed config that say how it will serve."""
    db = cfg.get("dynamic_batching")
    return {
        "backend": cfg.get("backend"), "platform": cfg.get("platform"), "runtime": cfg.get("runtime"),
        "max_batch_size": cfg.get("max_batch_size"),
        "instance_group": [{k: g.get(k) for k in ("name", "kind", "count")} for g in cfg.get("instance_group", [])],
        "dynamic_batching": ({"max_queue_delay_microseconds": db.get("max_queue_delay_microseconds"),
                              "preferred_batch_size": db.get("preferred_batch_size")} if db else None),
        "parameters": {k: (v or {}).get("string_value") for k, v in (cfg.get("parameters") or {}).items()},
        "inputs": [{k: t.get(k) for k in ("name", "data_type", "dims")} for t in cfg.get("input", [])],
        "outputs": [{k: t.get(k) for k in ("name", "data_type", "dims")} for t in cfg.get("output", [])],
    }


def check_one(sess: Session, repo, name: str, version: int | None = None, timeout: float = 120.0,
              protocols=PROTOCOLS) -> dict[str, Any]:
    """One model: load, verdict, parity over each protocol at batch 1 and max_batch_size."""
    versions = repo.versions(name)
    if not versions:
        raise UsageError(f"{repo.storage.location(name)}: no published version to check")
    if version is not None and version not in versions:
        raise UsageError(f"{repo.storage.location(name)}: no version {version} (versions: "
                         f"{', '.join(map(str, versions))})")
    sess.load(name, timeout=timeout)
    index = [e for e in sess.control.index() if e.get("name") == name]
    served = sorted(int(e["version"]) for e in index if e.get("state") == "READY" and str(e.get("version")).isdigit())
    if version is not None and version not in served:
        sess.load(name, _override_version(repo, name, version), timeout=timeout, version=version)
        index = [e for e in sess.control.index() if e.get("name") == name]
        served = [version]
    v = version if version is not None else (max(served) if served else versions[-1])
    ready = sess.control.ready(name, v)
    cfg = sess.control.config(name)
    out: dict[str, Any] = {"model": name, "version": v, "loaded": True, "ready": ready,
                           "index": index, "config": completed_config(cfg), "parity": [], "passed": ready}
    man = repo.manifest(name, v)
    entry = man.get("samples")
    from retool.serve import decoder, seq2seq

    if seq2seq.is_seq2seq(man):  # an encoder-decoder: its encoder is another model of the repository
        data = (smp.read_published(repo, name, v, entry, split=False)
                if entry and entry.get("file") and entry.get("kind") == "seq2seq" else None)
        out["seq2seq"] = seq2seq.check(sess, repo, name, v, man, cfg, data, protocols)
        out["passed"] = bool(ready and out["seq2seq"]["passed"])
        return out
    if decoder.is_decoder(man):  # random feeds do not fit a cache graph: a greedy generation, step by step
        data = None
        if entry and entry.get("file") and entry.get("kind") == "generation":
            data = smp.read_published(repo, name, v, entry, split=False)
        out["generation"] = decoder.check(sess, repo, name, v, man, cfg, data, protocols)
        out["passed"] = bool(ready and out["generation"]["passed"])
        return out
    if not entry or not entry.get("file"):
        why = (entry or {}).get("error") or "published before retool stored samples"
        out["note"] = f"no samples.npz in this version ({why}): parity not checked"
        return out
    data = smp.read_published(repo, name, v, entry)
    mbs = int(cfg.get("max_batch_size") or 0)
    rows = next(iter(data["in"].values())).shape[0] if data["in"] and mbs > 0 else 1
    batches = sorted({1, min(mbs, rows)}) if mbs > 0 else [None]
    outputs = list(data["out"])
    for proto in protocols:
        target = sess.http_url if proto == "http" else sess.grpc_url
        for b in batches:
            feed = {k: (a[:b] if b else a) for k, a in data["in"].items()}
            got = infer(proto, target, name, feed, outputs, version=v)
            want = {k: (a[:b] if b else a) for k, a in data["out"].items()}
            cmp = smp.compare(got, want)
            row = {"protocol": proto, "batch": b or "whole", **cmp}
            if data["ref"]:
                ref = smp.compare(got, {k: (a[:b] if b else a) for k, a in data["ref"].items()}, atol=float("inf"))
                row["vs_reference"] = {"max_abs": ref["max_abs"], "min_cosine": ref["min_cosine"]}
            out["parity"].append(row)
    out["passed"] = bool(ready and all(r["passed"] for r in out["parity"]))
    return out


def check(repo_url: str, name: str | None = None, version: int | None = None, *, url: str | None = None,
          grpc_url: str | None = None, timeout: float = 120.0, startup_timeout: float = 60.0) -> dict[str, Any]:
    """Check one model (``name``) or every model of the repository. Raises ModelLoadError (exit 7)
    with Triton's reason when a model does not load, ValidationFailed (exit 6) on a parity miss."""
    from retool.publish import open_repo

    repo = open_repo(repo_url)
    names = [repo.require_model(name)] if name else repo.models()
    if not names:
        raise UsageError(f"{repo.url}: no models to check")
    results, failures = [], []
    with open_session(repo_url, url=url, grpc_url=grpc_url, startup_timeout=startup_timeout) as sess:
        meta = sess.control.server_metadata()
        for n in names:
            try:
                results.append(check_one(sess, repo, n, version, timeout))
            except ModelLoadError as exc:  # the other models are still checked; exit 7 at the end
                results.append({"model": n, "loaded": False, "passed": False, "reason": str(exc)})
                failures.append(exc)
        report = {"repository": repo.url, "server": {"url": sess.http_url, "grpc": sess.grpc_url,
                                                     "version": meta.get("version"), "note": sess.backend_note},
                  "models": results, "passed": all(r.get("passed") for r in results)}
    if failures:
        more = f" (and {len(failures) - 1} more model(s) refused)" if len(failures) > 1 else ""
        err = ModelLoadError(f"{failures[0]}{more}")
        err.report = report
        raise err
    bad = [r for r in results if not r.get("passed")]
    if bad:
        r = bad[0]
        if r.get("seq2seq"):
            from retool.serve.seq2seq import failure as seq2seq_failure

            err = ValidationFailed(f"{r['model']} v{r.get('version')}: {seq2seq_failure(r['seq2seq']) or 'not ready'}")
            err.report = report
            raise err
        if r.get("generation"):
            from retool.serve.decoder import failure

            err = ValidationFailed(f"{r['model']} v{r.get('version')}: "
                                   f"{failure(r['generation']) or 'not ready'}")
            err.report = report
            raise err
        miss = next((p for p in r.get("parity", []) if not p["passed"]), None)
        what = (f"{miss['protocol']} batch {miss['batch']}: max |diff| {miss['max_abs']}" + (f" ({miss['detail']})"
                if miss.get("detail") else "")) if miss else "not ready"
        err = ValidationFailed(f"{r['model']} v{r.get('version')}: Triton's answers differ from the published samples "
                               f"({what})")
        err.report = report
        raise err
    return report


def render(report: dict) -> str:
    from retool import console

    lines = [f"Triton {report['server'].get('version')} at {report['server']['url']}: {report['server']['note']}"]
    rows = []
    for m in report["models"]:
        if not m.get("loaded"):
            rows.append([m["model"], "", "REFUSED", "", "", m.get("reason", "")[:120]])
            continue
        c = m["config"]
        inst = ", ".join(f"{g.get('count')}x{g.get('kind')}" for g in c["instance_group"])
        par = m.get("parity") or []
        worst = max((p["max_abs"] or 0.0 for p in par), default=None)
        where = " ".join(f"{p['protocol']}@{p['batch']}" for p in par)
        if m.get("generation") or m.get("seq2seq"):
            par = (m.get("generation") or m["seq2seq"])["protocols"]
            worst = max((p["max_logit_diff"] for p in par), default=None)
            where = "generation " + " ".join(p["protocol"] for p in par)
        rows.append([m["model"], m["version"], "ready" if m["ready"] else "NOT READY",
                     f"mbs {c['max_batch_size']}, {inst}" + (", batching" if c["dynamic_batching"] else ""),
                     "" if worst is None else f"{worst:.2e}", (where + (" PASS" if m["passed"] else " FAIL"))
                     if par else m.get("note", "")])
    lines.append(console.table(["model", "version", "state", "config (as Triton completed it)", "max |diff|",
                                "parity through the server"], rows))
    from retool.serve.decoder import render as render_generation

    from retool.serve.seq2seq import render as render_seq2seq

    for m in report["models"]:
        if m.get("generation"):
            lines += render_generation(m)
        if m.get("seq2seq"):
            lines += render_seq2seq(m)
    return "\n".join(lines)


def to_json(report: dict) -> str:
    from retool.types import jsonable

    return json.dumps(jsonable(report), indent=2)
