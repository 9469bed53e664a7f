"""retool publish, and retool repo list | show | verify | diff | promote | rollback."""
from __future__ import annotations

import json

import click

from retool.publish.signing import sign_options, trust_options

_REPO_HELP = "Repository: a folder, or an fsspec URL such as s3://bucket/models (endpoint: AWS_ENDPOINT_URL)."


def _echo_json(obj) -> None:
    from retool.types import jsonable

    click.echo(json.dumps(jsonable(obj), indent=2))


@click.command("publish")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--repo", "repo_url", required=True, help=_REPO_HELP)
@click.option("--name", required=True, help="Model name in the repository (Triton's model name).")
@click.option("--version", default="auto", show_default=True, help="Version number, or auto (latest + 1).")
@click.option("--report", type=click.Path(dir_okay=False),
              help="report.json from retool validate (default: the artifact's sidecar report if it matches).")
@click.option("--force", is_flag=True, help="Publish even if the report failed, is about another file, or the "
              "regression gate refuses; recorded.")
@click.option("--republish", is_flag=True, help="Make a new version even when the file is identical to the latest one.")
@click.option("--max-regression", metavar="SPEC",
              help="Regression limits against the latest/production version, e.g. latency=20%,size=10%,cosine=0.01 "
                   "(the default), or off.")
@click.option("--alias", help="Also point this alias (e.g. staging) at the new version.")
@click.option("--max-batch-size", type=int, help="Triton max_batch_size (default: the largest batch the report checked, else 8).")
@click.option("--instances", type=int, default=1, show_default=True, help="Triton instance_group count.")
@click.option("--serving-profile", type=click.Path(dir_okay=False),
              help="A serving profile from retool loadtest --budget-p99-ms: its instances, threads and batching go "
                   "into config.pbtxt, its measurement into the manifest.")
@sign_options
@click.option("--json", "as_json", is_flag=True, help="Print the publish report as JSON.")
def publish_cmd(artifact, repo_url, name, version, report, force, republish, max_regression, alias, max_batch_size, instances,
                serving_profile, sign_key, sign_cert, as_json):
    """Publish ARTIFACT (.onnx) as a new, immutable version of NAME in a Triton model repository.

    Writes <repo>/NAME/<version>/model.onnx (+ external data) and manifest.json atomically, and
    (re)generates NAME/config.pbtxt. Refuses (exit 7) a failing report or a regression unless --force.
    """
    from retool import console
    from retool.commands.common import emit_report
    from retool.publish import publish

    res = publish(artifact, repo_url, name, version=version, report=report, force=force,
                  max_regression=max_regression, alias=alias, max_batch_size=max_batch_size, instance_count=instances,
                  republish=republish, serving_profile=serving_profile, sign_key=sign_key, sign_cert=sign_cert)
    if res.unchanged:
        moved = f"; alias {alias} -> version {res.version}" if alias else ""
        if res.configured:
            what = (f"; serving configuration revised ({_settings_line(res.configured)}), config.pbtxt rewritten "
                    f"and recorded in the model's history")
        else:
            what = " (pass --republish to make one)"
        emit_report(res.to_report(), as_json,
                    f"unchanged: {artifact} is identical to {res.name} version {res.version} at {res.url}; no new "
                    f"version made{moved}{what}")
        return
    rows = [[c.name, c.passed if c.severity == "gate" else "info", c.message] for c in res.regression]
    human = (console.table(["check", "result", "note"], rows) + "\n\n" if rows else "")
    human += f"published {res.name} version {res.version} at {res.url}" + (" (FORCED: recorded)" if res.forced else "")
    human += f", signed ({res.url}/model.sig)" if sign_key else ""
    emit_report(res.to_report(), as_json, human)


@click.group("repo")
def repo_group():
    """Inspect and operate a model repository: list, show, verify, diff, promote, rollback, configure."""


@repo_group.command("list")
@click.argument("url")
@click.option("--json", "as_json", is_flag=True)
def repo_list(url, as_json):
    """Models, their versions and aliases."""
    from retool import console
    from retool.publish import open_repo
    from retool.publish.signing import CONFIG_SIGNATURE, label, state

    repo = open_repo(url)
    rows, out = [], []
    for name in repo.models():
        versions = repo.versions(name)
        als = repo.aliases(name)
        latest = repo.manifest(name, versions[-1]) if versions else {}
        pub = latest.get("published") or {}
        out.append({"name": name, "versions": versions,
                    "aliases": {a: e.get("version") for a, e in als.items()},
                    "latest": versions[-1] if versions else None,
                    "target": (latest.get("artifact") or {}).get("target"), "published": pub,
                    "signatures": {str(v): state(repo.storage, f"{name}/{v}") for v in versions},
                    "config_signature": state(repo.storage, name, CONFIG_SIGNATURE)})
        sigs = {label(st) for st in [*out[-1]["signatures"].values(), out[-1]["config_signature"]]}
        rows.append([name, ",".join(map(str, versions)), " ".join(f"{a}={e.get('version')}" for a, e in sorted(als.items())),
                     out[-1]["target"], pub.get("at"), pub.get("user"),
                     sigs.pop() if len(sigs) == 1 else "; ".join(
                         f"v{v} {label(st)}" for v, st in out[-1]["signatures"].items())
                     + f"; config {label(out[-1]['config_signature'])}"])
    if as_json:
        _echo_json({"repository": repo.url, "models": out})
    else:
        click.echo(console.table(["model", "versions", "aliases", "target", "latest published", "by", "signature"], rows)
                   if rows else f"{repo.url}: no models")


@repo_group.command("show")
@click.argument("url")
@click.argument("name")
@click.argument("version", required=False)
@click.option("--json", "as_json", is_flag=True)
def repo_show(url, name, version, as_json):
    """A model (versions, aliases, config.pbtxt) or one version's manifest."""
    from retool import console
    from retool.publish import open_repo
    from retool.publish.names import check_version

    repo = open_repo(url)
    name = repo.require_model(name)
    if version is None:
        data = {"name": name, "versions": repo.versions(name), "aliases": repo.aliases(name),
                "config": repo.config_text(name)}
        if as_json:
            return _echo_json(data)
        click.echo(f"{name}: versions {', '.join(map(str, data['versions'])) or 'none'}")
        for a, e in sorted(data["aliases"].items()):
            click.echo(f"  alias {a} -> {e.get('version')} (history {e.get('history')}, by {e.get('by')} at {e.get('updated')})")
        click.echo(f"\n{repo.storage.location(name + '/config.pbtxt')}:\n{data['config'] or '(missing)'}")
        return
    m = repo.manifest(name, check_version(version))
    if as_json:
        return _echo_json(m)
    prov, pub, ready = m.get("provenance") or {}, m.get("published") or {}, m.get("readiness") or {}
    art = m.get("artifact") or {}
    click.echo(f"{name} version {m.get('version')}: {art.get('precision')} target {art.get('target') or 'none'}, "
               f"opset {art.get('opset')}")
    click.echo(f"published by {pub.get('user')}@{pub.get('host')} at {pub.get('at')} with retool {m.get('retool_version')}"
               + ("  FORCED: " + "; ".join(m.get("forced_reasons", ())) if m.get("forced") else ""))
    click.echo(f"source sha256 {prov.get('source_sha256')}  ({prov.get('framework') or 'onnx'} {prov.get('source') or ''})")
    click.echo("chain: " + " > ".join(f"{p.get('stage')}({p.get('tool')})" for p in prov.get("chain", ())))
    if prov.get("versions"):
        click.echo("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(prov["versions"].items())))
    if prov.get("calibration"):
        click.echo(f"calibration: {json.dumps(prov['calibration'])}")
    click.echo(f"readiness: {'none' if ready.get('passed') is None else ('PASS' if ready['passed'] else 'FAIL')}"
               f" ({ready.get('source') or 'no report'})")
    from retool.publish.signing import label, state

    sig = label(state(repo.storage, f"{name}/{m.get('version')}"))
    click.echo(f"signature: {sig} (unverified; repo verify --trust-key checks it)")
    click.echo(console.table(["file", "size", "sha256"],
                             [[k, v.get("size"), v.get("sha256")] for k, v in (m.get("files") or {}).items()]))


@repo_group.command("verify")
@click.argument("url")
@click.argument("name", required=False)
@trust_options
@click.option("--json", "as_json", is_flag=True)
def repo_verify(url, name, require_signature, trust_key, as_json):
    """Recompute every hash; any changed, added or missing file exits 7.

    With --trust-key, also check every version's model.sig and the model's config.sig with OpenSSF
    model-signing: unsigned, signed by another key, or changed since signing exits 7."""
    from retool.errors import PublishError, UsageError

    if require_signature and not trust_key:
        raise UsageError("--require-signature needs --trust-key PUB.pem (the publisher's public key)")
    _hash_early(url, name)  # before the imports below: the bytes are read meanwhile
    from retool import console
    from retool.fsutil import end_early
    from retool.publish import open_repo
    from retool.publish import signing

    repo = open_repo(url)
    # with a trust key: one pass over the bytes serves the manifests and the signatures
    try:
        findings, checked = signing.verify_repository(repo, name, trust_key)
    finally:
        end_early()
    if as_json:
        _echo_json({"repository": repo.url, "files_checked": checked, "ok": not findings,
                    "findings": [f.to_dict() for f in findings]})
    elif findings:
        click.echo(console.table(["model", "version", "problem", "path", "detail"],
                                 [[f.model, f.version, f.problem, f.path, f.detail] for f in findings]))
    else:
        click.echo(f"{repo.url}: OK ({checked} files checked)")
    if findings:
        f = findings[0]
        more = f" and {len(findings) - 1} more" if len(findings) > 1 else ""
        raise PublishError(f"{f.path}: {f.problem}{more}; the repository does not match its manifests"
                           + (" and signatures" if trust_key else ""))


def _hash_early(url: str, name: str | None) -> None:
    """A local repository's version files start hashing in a child (fsutil.hash_early); verify takes those
    digests. Paths are made by ``inside``, as verify makes them; anything odd is left to verify to report."""
    import os
    from pathlib import Path

    from retool.errors import UnsafePath
    from retool.fsutil import hash_early, inside

    root = Path(url).expanduser()
    if "://" in url or not root.is_dir():
        return
    files = []
    try:
        for model in [name] if name else sorted(os.listdir(root)):
            folder = inside(root, model)
            for v in sorted(os.listdir(folder)) if folder.is_dir() else ():
                if v.isascii() and v.isdigit():
                    base = inside(folder, v)
                    files += [inside(root, f"{model}/{v}/{f.relative_to(base).as_posix()}")
                              for f in base.rglob("*") if f.is_file() and not f.is_symlink()]
    except (OSError, UnsafePath):
        return
    hash_early(files)


@repo_group.command("diff")
@click.argument("url")
@click.argument("name")
@click.argument("v1")
@click.argument("v2")
@click.option("--json", "as_json", is_flag=True)
def repo_diff(url, name, v1, v2, as_json):
    """What differs between two versions: files, target, provenance, metrics, publisher."""
    from retool import console
    from retool.publish import open_repo

    rows = open_repo(url).diff(name, v1, v2)
    if as_json:
        return _echo_json({"name": name, "v1": v1, "v2": v2, "differences": [
            {"field": k, "v1": a, "v2": b} for k, a, b in rows]})
    click.echo(console.table(["field", f"v{v1}", f"v{v2}"], rows) if rows else f"{name}: v{v1} and v{v2} are identical")


@repo_group.command("promote")
@click.argument("url")
@click.argument("name")
@click.argument("version")
@click.option("--alias", default="production", show_default=True)
@sign_options
@click.option("--json", "as_json", is_flag=True)
def repo_promote(url, name, version, alias, sign_key, sign_cert, as_json):
    """Point ALIAS at VERSION (after verifying it) and make Triton serve it (version_policy)."""
    from retool.publish import open_repo
    from retool.publish.signing import signer

    out = open_repo(url, signer=signer(sign_key, sign_cert)).promote(name, version, alias)
    if as_json:
        return _echo_json(out)
    click.echo(f"{name}: {alias} -> {out['version']} (was {out['previous'] if out['previous'] is not None else 'unset'})")


def _settings_line(entry) -> str:
    def fmt(t):
        db = t.get("dynamic_batching")
        thr = (t.get("parameters") or {}).get("intra_op_thread_count") or "default"
        batching = ("no batching" if db is False else f"batching {db.get('max_queue_delay_microseconds')} us"
                    if isinstance(db, dict) else "batching 100 us")
        return f"{t.get('instance_count', 1)} inst x {thr} thr, {batching}"
    return f"{fmt(entry.get('old') or {})} -> {fmt(entry.get('new') or {})}"


@repo_group.command("configure")
@click.argument("url")
@click.argument("name")
@click.option("--profile", "profile", required=True, type=click.Path(dir_okay=False),
              help="A serving profile from retool loadtest --budget-p99-ms ... --profile-out FILE.")
@click.option("--version", default=None, help="The version to configure (default: the one config.pbtxt serves).")
@sign_options
@click.option("--json", "as_json", is_flag=True)
def repo_configure(url, name, profile, version, sign_key, sign_cert, as_json):
    """A config revision: serve a published version with PROFILE's instances, threads and batching.

    Rewrites NAME/config.pbtxt atomically without a new version, and records the old and new settings,
    the profile's measurement, the time and the user in NAME/history.json (repo verify keeps passing)."""
    from retool.publish import open_repo
    from retool.publish.signing import signer

    entry = open_repo(url, signer=signer(sign_key, sign_cert)).configure(name, profile, version)
    if as_json:
        return _echo_json(entry)
    click.echo(f"{name} version {entry['version']}: {_settings_line(entry)} (config.pbtxt rewritten; recorded "
               f"in history.json)")


@repo_group.command("history")
@click.argument("url")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def repo_history(url, name, as_json):
    """Every change retool made to NAME: publish, promote, rollback, configure."""
    from retool.publish import open_repo

    repo = open_repo(url)
    name = repo.require_model(name)
    events = repo.history(name)
    if as_json:
        return _echo_json({"name": name, "history": events})
    for e in events:
        extra = " ".join(f"{k}={e[k]}" for k in ("version", "alias", "previous") if e.get(k) is not None)
        click.echo(f"{e.get('at')} {e.get('event')} {extra} by {e.get('by')}@{e.get('host')}")


@repo_group.command("sign")
@click.argument("url")
@click.argument("name")
@sign_options
@click.option("--json", "as_json", is_flag=True)
def repo_sign(url, name, sign_key, sign_cert, as_json):
    """Sign a model published without --sign-key: its unsigned versions and its config (config.sig).

    Refused (exit 7) unless retool repo verify finds nothing wrong with the model first."""
    from retool.errors import UsageError
    from retool.publish import open_repo
    from retool.publish.signing import sign_published, signer

    if not sign_key:
        raise UsageError("repo sign needs --sign-key KEY.pem")
    done = sign_published(open_repo(url, signer=signer(sign_key, sign_cert)), name)
    if as_json:
        return _echo_json({"name": name, "signed_versions": done})
    click.echo(f"{name}: signed version(s) {', '.join(map(str, done)) or 'none (all were signed)'} and config.sig")


@repo_group.command("rollback")
@click.argument("url")
@click.argument("name")
@click.option("--alias", default="production", show_default=True)
@sign_options
@click.option("--json", "as_json", is_flag=True)
def repo_rollback(url, name, alias, sign_key, sign_cert, as_json):
    """Move ALIAS back to the version it pointed at before."""
    from retool.publish import open_repo
    from retool.publish.signing import signer

    out = open_repo(url, signer=signer(sign_key, sign_cert)).rollback(name, alias)
    if as_json:
        return _echo_json(out)
    click.echo(f"{name}: {alias} -> {out['version']} (rolled back from {out['previous']})")


from retool.commands.serve import repo_check as _repo_check  # noqa: E402  (click only: --help stays light)

repo_group.add_command(_repo_check)
