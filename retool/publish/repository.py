"""A Triton model repository: publish versions, list, show, verify, diff, promote and roll back.

Layout (what Triton reads, plus retool's hidden bookkeeping)::

    <repo>/<name>/config.pbtxt          generated; version_policy follows the aliases
    <repo>/<name>/<N>/model.onnx        (+ its external data files)
    <repo>/<name>/<N>/manifest.json     hashes, provenance, readiness report, publisher
    <repo>/<name>/aliases.json          production / staging ... -> version, with history
    <repo>/<name>/serving.json          serving profiles applied after publish (retool repo configure)
    <repo>/<name>/history.json          the index: sha256 of config and manifests, aliases, every change
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from retool.errors import PublishError, UnsafePath, UsageError
from retool.publish import index, regression
from retool.publish.config import DEFAULT_MAX_BATCH, batchable, build_config, parse_with_triton_schema
from retool.publish.manifest import build_manifest, publisher
from retool.publish.names import (ascii_digits, check_alias, check_instances, check_max_batch_size, check_model_name,
                                  check_version, version_of)
from retool.publish.storage import MANIFEST, MODEL_FILE, Storage, open_storage
from retool.types import CheckResult, ModelArtifact, Report, now_iso

CONFIG = "config.pbtxt"
ALIASES = "aliases.json"
#: serving profiles measured after publish (retool run's serve step): version -> triton settings
SERVING = "serving.json"


@dataclass(frozen=True)
class PublishResult:
    name: str
    version: int
    url: str
    manifest: Mapping[str, Any]
    forced: bool
    regression: tuple[CheckResult, ...] = ()
    #: the file was identical to the latest version, so no new version was made
    unchanged: bool = False
    #: a serving profile applied to an unchanged version (a config revision): the history entry
    configured: Mapping[str, Any] | None = None

    @property
    def path(self) -> str:
        return self.url

    def to_report(self) -> Report:
        art = ModelArtifact.from_dict({**self.manifest["artifact"], "path": f"{self.url}/{MODEL_FILE}"})
        return Report("publish", art, self.regression,
                      {"name": self.name, "version": self.version, "url": self.url, "forced": self.forced,
                       "unchanged": self.unchanged,
                       "forced_reasons": list(self.manifest.get("forced_reasons", ())),
                       "files": self.manifest.get("files"), "published": self.manifest.get("published")})


@dataclass(frozen=True)
class Finding:
    """One thing wrong in a repository, found by verify."""

    model: str
    version: int | None
    path: str
    problem: str  # changed | added | missing | incomplete | bad-manifest | bad-config | bad-alias
    detail: str = ""

    def to_dict(self) -> dict:
        return {"model": self.model, "version": self.version, "path": self.path, "problem": self.problem,
                "detail": self.detail}


def open_repo(url, storage_options: Mapping | None = None) -> "Repository":
    return Repository(open_storage(str(url), storage_options))


class Repository:
    def __init__(self, storage: Storage):
        self.storage = storage
        self.url = storage.url

    # ---- reading -----------------------------------------------------------------------------
    def _require_root(self) -> None:
        if not self.storage.root_exists():
            raise UsageError(f"{self.url}: no model repository here; check the URL or publish to it first")

    def models(self) -> list[str]:
        self._require_root()
        out = []
        for entry in self.storage.listdir(""):
            if entry.startswith("."):
                continue
            kids = self.storage.listdir(entry)
            if CONFIG in kids or any(ascii_digits(k) for k in kids):
                out.append(entry)
        return out

    def _require_model(self, name: str) -> str:
        name = check_model_name(name)
        self._require_root()
        if not self.storage.listdir(name):
            known = ", ".join(self.models()) or "none"
            raise UsageError(f"{self.url}: no model named {name!r} (models: {known})")
        return name

    def versions(self, name: str) -> list[int]:
        """Committed versions (their manifest exists), ascending."""
        kids = self.storage.listdir(name)
        return sorted(v for k in kids if (v := version_of(k)) is not None and not self.storage.is_link(f"{name}/{k}")
                      and self.storage.exists(f"{name}/{k}/{MANIFEST}"))

    def _version_folders(self, name: str) -> dict[str, str]:
        """Entries named with ASCII digits -> 'ok', 'non-canonical' ('01', '0') or 'symlink'."""
        out = {}
        for k in self.storage.listdir(name):
            if ascii_digits(k):
                out[k] = ("symlink" if self.storage.is_link(f"{name}/{k}") else
                          "ok" if version_of(k) is not None else "non-canonical")
        return out

    def manifest(self, name: str, version: int) -> dict:
        try:
            return self.storage.read_json(f"{name}/{version}/{MANIFEST}")
        except FileNotFoundError:
            have = ", ".join(map(str, self.versions(name))) or "none"
            raise UsageError(f"{self.storage.location(name)}: no version {version} (versions: {have})") from None
        except ValueError as exc:
            raise PublishError(f"{self.storage.location(f'{name}/{version}/{MANIFEST}')}: damaged manifest "
                               f"({exc}); run retool repo verify") from None

    def aliases(self, name: str) -> dict:
        try:
            data = self.storage.read_json(f"{name}/{ALIASES}")
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise PublishError(f"{self.storage.location(f'{name}/{ALIASES}')}: damaged ({exc}); "
                               f"fix or delete it, then promote again") from None
        return dict(data.get("aliases", {}))

    def config_text(self, name: str) -> str | None:
        try:
            return self.storage.read_bytes(f"{name}/{CONFIG}").decode()
        except FileNotFoundError:
            return None

    # ---- publishing ------------------------------------------------------------------------------
    def publish(self, artifact, name: str, *, version="auto", report=None, force: bool = False,
                max_regression=None, alias: str | None = None, max_batch_size: int | None = None,
                instance_count: int = 1, republish: bool = False, serving_profile=None, samples: bool = True,
                samples_reference=None) -> PublishResult:
        """``serving_profile``: a file from ``retool loadtest --budget-p99-ms`` (or its dict): its
        configuration goes into config.pbtxt and its measurement into the manifest. ``samples``: store
        held-out inputs and their outputs (``samples_reference``: also the outputs of the model this
        one was optimised from) for ``retool repo check``."""
        import tempfile

        from retool import console
        from retool.serve.profile import serving_settings

        name = check_model_name(name)
        alias = check_alias(alias) if alias else None
        requested = None if str(version).strip().lower() == "auto" else check_version(version)
        limits = regression.parse_spec(max_regression)
        check_instances(instance_count)
        if max_batch_size is not None:
            check_max_batch_size(max_batch_size)
        art = _load_artifact(artifact)
        rep, rep_source = _load_report(report, art)
        base_reasons: list[str] = []
        if rep is not None and not rep.passed:
            failed = ", ".join(c.name for c in rep.failed_checks)
            if not force:
                raise PublishError(f"{rep_source}: the readiness report failed ({failed}); fix the model, or pass "
                                   f"--force to publish anyway (recorded in the manifest)", report=rep)
            base_reasons.append(f"readiness report failed: {failed}")
            console.warn(f"publishing {name} although its report failed ({failed}); recorded as forced")
        matches = None
        if rep is not None and rep.artifact is not None and rep.artifact.sha256:
            matches = rep.artifact.sha256 == art.sha256
            if not matches:
                # its gates and the regression check would use another model's numbers
                what = (f"{rep_source}: the report is about another file ({rep.artifact.path}, sha256 "
                        f"{rep.artifact.sha256[:12]}…), not {art.path} (sha256 {art.sha256[:12]}…)")
                if not force:
                    raise PublishError(f"{what}; pass the report written for this file, or --force to publish "
                                       f"anyway (recorded in the manifest)", report=rep)
                base_reasons.append("the report is about another file (sha256 differs)")
                console.warn(f"{what}; publishing anyway (--force), recorded")
        if _sha(art.path) != art.sha256:
            raise PublishError(f"{art.path}: the file changed since its artifact was read (sha256 differs); publish again")
        files = _artifact_files(art)
        new_size = sum(p.stat().st_size for p in files.values())  # the model's size, not its samples
        rep_dict = rep.to_dict() if rep is not None else None
        triton = {"max_batch_size": _max_batch(art, rep, max_batch_size), "instance_count": int(instance_count)}
        if serving_profile is not None:  # what publish writes without a profile: the default, kept
            triton["default"] = {**triton, **serving_settings(art.path, None, triton["max_batch_size"], name)}
        triton.update(serving_settings(art.path, serving_profile, triton["max_batch_size"], name))
        check_instances(triton["instance_count"], f"{serving_profile or 'serving profile'}: instance_count")
        who = {**publisher(), "at": now_iso()}
        tmp_samples = tempfile.TemporaryDirectory(prefix="retool-samples-")
        samples_entry = None
        if samples:
            from retool.serve.samples import SAMPLES_FILE, build

            try:
                data, samples_entry = build(art.path, triton["max_batch_size"], samples_reference, report=rep_dict)
            except Exception as exc:  # noqa: BLE001 - samples serve repo check; they never block a publish
                from retool.errors import first_line

                samples_entry = {"error": first_line(exc, 300, with_type=True)}
                console.warn(f"{art.path}: no serving samples ({samples_entry['error']}); retool repo check "
                             f"will load the model but not compare its answers")
            else:
                sp = Path(tmp_samples.name) / SAMPLES_FILE
                sp.write_bytes(data)
                model_file = files.pop(MODEL_FILE)
                files = {**files, SAMPLES_FILE: sp, MODEL_FILE: model_file}  # the model stays last (commit order)
        info = {rel: {"sha256": _sha(p), "size": p.stat().st_size} for rel, p in files.items()}

        store = self.storage
        with console.step(f"staging {art.path.name} for {name}"):
            staged = store.stage(name, files)
        try:
            with store.lock(name):
                store.clean_stale(name)
                self._recover(name)
                for _ in range(10000):
                    committed = self.versions(name)
                    if committed and requested is None and not republish:
                        latest = self.manifest(name, committed[-1])
                        if _same_files(latest.get("files"), info):
                            revised = None
                            if serving_profile is not None:  # a config revision, not a new version
                                revised = self._configure_locked(name, committed[-1], serving_profile)
                            if alias:
                                self._move_alias(name, alias, committed[-1])
                                self._commit_state(name, index.event("promote", alias=alias,
                                                                     version=committed[-1]))
                            return PublishResult(name, committed[-1], store.location(f"{name}/{committed[-1]}"),
                                                 latest, False, (), unchanged=True, configured=revised)
                    baselines = {}
                    if committed:
                        baselines["latest"] = committed[-1]
                        prod = self.aliases(name).get("production", {}).get("version")
                        if prod in committed and prod != committed[-1]:
                            baselines["production"] = prod
                    checks: list[CheckResult] = []
                    for v in dict.fromkeys(baselines.values()):
                        checks += regression.compare(rep_dict, new_size, self.manifest(name, v), limits)
                    bad = [c for c in checks if c.severity == "gate" and not c.passed]
                    reasons = list(base_reasons)
                    if bad:
                        what = "; ".join(f"{c.name}: {c.message}" for c in bad)
                        if not force:
                            raise PublishError(f"{name}: regression against the published version ({what}); "
                                               f"loosen --max-regression or pass --force (recorded)",
                                               report=Report("publish", art, tuple(checks)))
                        reasons.append(f"regression: {what}")
                    taken = store.taken_versions(name)
                    v = requested if requested is not None else max(taken | {0}) + 1
                    if requested is not None and v in taken:
                        raise PublishError(f"{store.location(f'{name}/{v}')}: version {v} exists and published "
                                           f"versions are never overwritten; use --version auto")
                    manifest = build_manifest(
                        name=name, version=v, art=art, files=info, report=rep, report_source=rep_source,
                        report_matches=matches, forced=bool(reasons), forced_reasons=reasons, regression=checks,
                        limits=limits.to_dict(), baselines=baselines, triton=triton, published=who,
                        samples=samples_entry)
                    mbytes = (json.dumps(manifest, indent=2) + "\n").encode()
                    if self._commit_version(name, staged, v, manifest, mbytes, first=not committed):
                        break
                    if requested is not None:
                        raise PublishError(f"{store.location(f'{name}/{v}')}: version {v} was just taken by "
                                           f"another publisher; use --version auto")
                else:  # pragma: no cover - would need 10000 concurrent winners
                    raise PublishError(f"{store.location(name)}: could not claim a version; retry")
                if alias:
                    self._move_alias(name, alias, v)
                self._commit_state(name, None)
        finally:
            store.discard(staged)
            tmp_samples.cleanup()
        return PublishResult(name, v, store.location(f"{name}/{v}"), manifest, bool(reasons), tuple(checks))

    def _commit_version(self, name: str, staged, v: int, manifest: dict, mbytes: bytes, *, first: bool) -> bool:
        """Make version ``v`` visible, recorded as pending in the index first, so that a publisher killed
        at any point leaves a state verify accepts and the next writer finishes (:meth:`_recover`)."""
        from retool.fsutil import sha256_bytes

        idx = self._index(name)
        idx["pending"] = index.event("publish", version=v, manifest_sha256=sha256_bytes(mbytes))
        index.write(self, name, idx)
        if first:  # the config is in place before the version: a reader never sees a version without one
            text = self.render_config(name, extra=(v, manifest))
            if text is not None:
                self.storage.write_bytes(f"{name}/{CONFIG}", text.encode())
        if self.storage.commit(staged, v, mbytes):
            _test_pause()
            return True
        idx.pop("pending", None)  # lost the race for v: nothing of ours is visible
        index.write(self, name, idx)
        return False

    def _index(self, name: str) -> dict:
        idx = index.read(self, name)
        return idx if idx is not None else index.adopt(self, name)

    def _recover(self, name: str) -> None:
        """Finish what a killed writer left pending (under the lock)."""
        idx = index.read(self, name)
        if idx and idx.get("pending"):
            self._commit_state(name, None)

    def _commit_state(self, name: str, event: dict | None) -> str | None:
        """Rewrite config.pbtxt from the repository, then the index: its sha256, the aliases, a version
        left pending (added with the manifest hash taken at publish) and ``event`` in the history."""
        from retool.fsutil import sha256_bytes

        text = self.write_config(name)
        idx = self._index(name)
        pending = idx.pop("pending", None)
        if pending and pending.get("version") in self.versions(name):
            v = pending["version"]
            idx["versions"][str(v)] = pending.get("manifest_sha256") or index.manifest_sha(self, name, v)
            idx["history"].append({**pending, "config_sha256": sha256_bytes(text.encode()) if text else None,
                                   "completed": index.event("complete")["at"]})
        idx["aliases"] = index.alias_map(self.aliases(name))
        idx["config_sha256"] = sha256_bytes(text.encode()) if text is not None else idx.get("config_sha256")
        if event:
            idx["history"].append({**event, "config_sha256": idx["config_sha256"]})
        index.write(self, name, idx)
        return text

    def render_config(self, name: str, extra: tuple[int, Mapping] | None = None) -> str | None:
        """config.pbtxt as retool writes it: the served versions are the aliased ones, or the latest
        when none. ``extra``: (version, manifest) of a version about to be committed."""
        committed = self.versions(name)
        if extra is not None:
            committed = sorted({*committed, extra[0]})
        if not committed:
            return None
        served = sorted({int(a["version"]) for a in self.aliases(name).values() if int(a["version"]) in committed})
        shown = max(served) if served else committed[-1]
        m = extra[1] if extra is not None and extra[0] == shown else self.manifest(name, shown)
        t = self.effective_settings(name, shown, m)
        return build_config(name, m["artifact"], served_versions=served or None,
                            max_batch_size=t.get("max_batch_size"), instance_count=t.get("instance_count", 1),
                            dynamic_batching=t.get("dynamic_batching", True), parameters=t.get("parameters"))

    def effective_settings(self, name: str, version: int, manifest: Mapping | None = None) -> dict:
        """The Triton settings ``version`` is served with: the manifest's, then a profile applied later."""
        m = manifest if manifest is not None else self.manifest(name, version)
        return {**(m.get("triton") or {}), **self.serving_profiles(name).get(str(version), {})}

    def write_config(self, name: str) -> str | None:
        """(Re)write config.pbtxt (see :meth:`render_config`); callers then record it in the index."""
        text = self.render_config(name)
        if text is not None:
            self.storage.write_bytes(f"{name}/{CONFIG}", text.encode())
        return text

    def serving_profiles(self, name: str) -> dict:
        try:
            return dict(self.storage.read_json(f"{name}/{SERVING}").get("versions", {}))
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise PublishError(f"{self.storage.location(f'{name}/{SERVING}')}: damaged ({exc}); delete it and "
                               f"run the serve step again") from None

    def set_serving_profile(self, name: str, version: int, profile) -> str | None:
        """Serve ``version`` with a profile measured after it was published. Returns the config."""
        self.configure(name, profile, version)
        return self.config_text(name)

    def configure(self, name: str, profile, version=None) -> dict:
        """A config revision: serve ``version`` (default: the one config.pbtxt describes) with ``profile``
        without a new version. The manifest stays as published; the profile goes into NAME/serving.json,
        config.pbtxt is rewritten atomically, and the old and new settings, the profile's measurement,
        the time and the user go into the model's history. Returns that history entry."""
        name = self._require_model(name)
        with self.storage.lock(name):
            self.storage.clean_stale(name)
            self._recover(name)
            committed = self.versions(name)
            if version is None:
                if not committed:
                    raise UsageError(f"{self.storage.location(name)}: no published version to configure")
                served = [v for v in index.alias_map(self.aliases(name)).values() if v in committed]
                version = max(served) if served else committed[-1]
            return self._configure_locked(name, check_version(version), profile)

    def _configure_locked(self, name: str, version: int, profile) -> dict:
        from retool.serve.profile import load_profile, serving_settings

        if version not in self.versions(name):
            have = ", ".join(map(str, self.versions(name))) or "none"
            raise UsageError(f"{self.storage.location(name)}: no version {version} to apply a serving profile to "
                             f"(versions: {have})")
        where = profile if isinstance(profile, (str, Path)) else "serving profile"
        prof = load_profile(profile)
        old = self.effective_settings(name, version)
        mbs = int(old.get("max_batch_size") or 0)
        new = {**serving_settings(None, prof, mbs, name), "applied": now_iso(), "by": publisher()["user"]}
        check_instances(new.get("instance_count"), f"{where}: instance_count")
        allp = self.serving_profiles(name)
        allp[str(version)] = new
        self.storage.write_json(f"{name}/{SERVING}", {"versions": allp})
        keep = ("max_batch_size", "instance_count", "dynamic_batching", "parameters")
        entry = index.event("configure", version=version,
                            old={k: old.get(k) for k in keep if k in old},
                            new={k: v for k, v in {**old, **new}.items() if k in keep},
                            measurement=dict(prof.measurement), profile_model=prof.model or None)
        self._commit_state(name, entry)
        return entry

    def history(self, name: str) -> list[dict]:
        idx = index.read(self, self._require_model(name))
        return list((idx or {}).get("history") or ())

    def serving_config(self, name: str):
        """The configuration config.pbtxt serves now, as a ServingConfig (None without a config)."""
        from retool.serve.tune import from_config

        text = self.config_text(name)
        return None if text is None else from_config(config_json(text))

    def default_serving_config(self, name: str, version=None):
        """What publish writes for ``version`` (default: the latest) without a serving profile: THE
        default that every comparison uses, whatever profile is applied now."""
        from retool.serve.tune import from_config

        name = self._require_model(name)
        v = check_version(version) if version is not None else self.versions(name)[-1]
        m = self.manifest(name, v)
        t = dict(m.get("triton") or {})
        t = dict(t.get("default") or t) if "serving_profile" in t or "default" in t else t
        text = build_config(name, m["artifact"], max_batch_size=t.get("max_batch_size"),
                            instance_count=t.get("instance_count", 1), dynamic_batching=True,
                            parameters=t.get("parameters"))
        return from_config(config_json(text))

    # ---- aliases ------------------------------------------------------------------------------------
    def _move_alias(self, name: str, alias: str, version: int, *, rollback: bool = False) -> dict:
        als = self.aliases(name)
        entry = dict(als.get(alias) or {"history": []})
        prev = entry.get("version")
        history = list(entry.get("history", []))
        if rollback:
            history = history[:-1]
        elif prev is not None and prev != version:
            history.append(prev)
        who = publisher()
        als[alias] = {"version": version, "history": history, "updated": now_iso(), "by": who["user"],
                      "host": who["host"]}
        self.storage.write_json(f"{name}/{ALIASES}", {"aliases": als})
        return {"model": name, "alias": alias, "version": version, "previous": prev}

    def promote(self, name: str, version, alias: str) -> dict:
        name = self._require_model(name)
        alias = check_alias(alias)
        v = check_version(version)
        if v not in self.versions(name):
            have = ", ".join(map(str, self.versions(name))) or "none"
            raise UsageError(f"{self.storage.location(name)}: no version {v} to promote (versions: {have})")
        bad = self.verify_version(name, v)
        if bad:
            raise PublishError(f"{self.storage.location(f'{name}/{v}')}: refusing to promote a damaged version "
                               f"({bad[0].path}: {bad[0].problem}); run retool repo verify")
        with self.storage.lock(name):
            self._recover(name)
            out = self._move_alias(name, alias, v)
            self._commit_state(name, index.event("promote", alias=alias, version=v, previous=out["previous"]))
        return out

    def rollback(self, name: str, alias: str) -> dict:
        name = self._require_model(name)
        alias = check_alias(alias)
        with self.storage.lock(name):
            self._recover(name)
            entry = self.aliases(name).get(alias)
            if not entry:
                raise UsageError(f"{self.storage.location(name)}: no alias {alias!r} to roll back; promote first")
            if not entry.get("history"):
                raise PublishError(f"{self.storage.location(name)}: alias {alias!r} has no earlier version "
                                   f"(it has only pointed at {entry['version']}); promote a version instead")
            target = int(entry["history"][-1])
            if target not in self.versions(name) or self.verify_version(name, target):
                raise PublishError(f"{self.storage.location(f'{name}/{target}')}: the previous version of "
                                   f"{alias!r} is missing or damaged; promote a version explicitly")
            out = self._move_alias(name, alias, target, rollback=True)
            out["previous"] = entry["version"]
            self._commit_state(name, index.event("rollback", alias=alias, version=target, previous=entry["version"]))
        return out

    # ---- checking ----------------------------------------------------------------------------------------
    def verify_version(self, name: str, version: int) -> list[Finding]:
        base = f"{name}/{version}"
        loc = self.storage.location
        try:
            m = self.storage.read_json(f"{base}/{MANIFEST}")
            listed = dict(m["files"])
        except FileNotFoundError:
            return [Finding(name, version, loc(base), "incomplete",
                            "no manifest.json: left by an interrupted publish, or not published by retool")]
        except (ValueError, KeyError, TypeError) as exc:
            return [Finding(name, version, loc(f"{base}/{MANIFEST}"), "bad-manifest", str(exc))]
        out = []
        present = set(self.storage.files(base)) - {MANIFEST}
        for rel, meta in sorted(listed.items()):
            if rel not in present:
                out.append(Finding(name, version, loc(f"{base}/{rel}"), "missing"))
                continue
            try:
                digest = self.storage.sha256(f"{base}/{rel}")
            except UnsafePath as exc:
                out.append(Finding(name, version, loc(base), "unsafe-path", str(exc)))
                continue
            if digest != meta.get("sha256"):
                out.append(Finding(name, version, loc(f"{base}/{rel}"), "changed",
                                   f"sha256 {digest[:12]}… but the manifest says {str(meta.get('sha256'))[:12]}…"))
        for rel in sorted(present - set(listed)):
            try:
                where = loc(f"{base}/{rel}")
            except UnsafePath as exc:
                out.append(Finding(name, version, loc(base), "unsafe-path", str(exc)))
                continue
            out.append(Finding(name, version, where, "added", "not in the manifest"))
        return out

    def verify(self, name: str | None = None) -> tuple[list[Finding], int]:
        """Recompute every hash. Returns (findings, number of files checked)."""
        names = [self._require_model(name)] if name else self.models()
        findings: list[Finding] = []
        checked = 0
        for n in names:
            try:
                folders = self._version_folders(n)
                self.storage.files(n)
            except UnsafePath as exc:
                findings.append(Finding(n, None, self.url, "unsafe-path", str(exc)))
                continue
            versions = sorted(int(k) for k, kind in folders.items() if kind == "ok")
            for v in versions:
                findings += self.verify_version(n, v)
                checked += len(self.storage.files(f"{n}/{v}"))
            committed = self.versions(n)
            findings += index.check(self, n, folders, committed)
            text = self.config_text(n)
            if text is None and committed:
                findings.append(Finding(n, None, self.storage.location(f"{n}/{CONFIG}"), "missing",
                                        "no config.pbtxt; promote or publish again to regenerate it"))
            elif text is not None:
                try:
                    cfg = parse_with_triton_schema(text)
                except Exception as exc:  # protobuf's ParseError, with the line and column
                    findings.append(Finding(n, None, self.storage.location(f"{n}/{CONFIG}"), "bad-config",
                                            f"does not parse with Triton's schema: {exc}"))
                else:
                    if cfg is not None and cfg.name != n:
                        findings.append(Finding(n, None, self.storage.location(f"{n}/{CONFIG}"), "bad-config",
                                                f"name {cfg.name!r} differs from the folder name"))
            try:
                als = self.aliases(n)
            except PublishError as exc:
                findings.append(Finding(n, None, self.storage.location(f"{n}/{ALIASES}"), "bad-alias", str(exc)))
                als = {}
            for a, entry in sorted(als.items()):
                if int(entry.get("version", -1)) not in committed:
                    findings.append(Finding(n, None, self.storage.location(f"{n}/{ALIASES}"), "bad-alias",
                                            f"{a} points at version {entry.get('version')}, which does not exist"))
        return findings, checked

    def diff(self, name: str, v1, v2) -> list[tuple[str, Any, Any]]:
        """Fields that differ between two versions: (field, value in v1, value in v2)."""
        name = self._require_model(name)
        a, b = self.manifest(name, check_version(v1)), self.manifest(name, check_version(v2))
        fa, fb = _facts(a), _facts(b)
        return [(k, fa.get(k), fb.get(k)) for k in dict.fromkeys([*fa, *fb]) if fa.get(k) != fb.get(k)]


def _facts(m: Mapping) -> dict[str, Any]:
    """The comparable facts of one manifest, flattened."""
    art = m.get("artifact") or {}
    prov = m.get("provenance") or {}
    rep = m.get("report")
    out: dict[str, Any] = {}
    for rel, f in sorted((m.get("files") or {}).items()):
        out[f"file {rel} sha256"] = f.get("sha256")
        out[f"file {rel} size"] = f.get("size")
    out["size total"] = sum(int(f.get("size", 0)) for f in (m.get("files") or {}).values())
    for k in ("format", "opset", "precision", "target"):
        out[k] = art.get(k)
    out["inputs"] = ", ".join(f"{t['name']}:{t.get('dtype')}:{t.get('shape')}" for t in art.get("inputs", ()))
    out["outputs"] = ", ".join(f"{t['name']}:{t.get('dtype')}:{t.get('shape')}" for t in art.get("outputs", ()))
    out["source sha256"] = prov.get("source_sha256")
    out["provenance"] = " > ".join(f"{p.get('stage')}({p.get('tool')})" for p in prov.get("chain", ()))
    for lib, ver in sorted((prov.get("versions") or {}).items()):
        out[f"version {lib}"] = ver
    out["calibration"] = json.dumps(prov.get("calibration"), sort_keys=True) if prov.get("calibration") else None
    for k, val in regression.latency_metrics(rep).items():
        out[f"latency {k}"] = val
    out["parity min cosine"] = regression.min_cosine(rep)
    out["readiness passed"] = (m.get("readiness") or {}).get("passed")
    out["forced"] = m.get("forced")
    pub = m.get("published") or {}
    out["published by"] = f"{pub.get('user')}@{pub.get('host')}"
    out["published at"] = pub.get("at")
    out["retool version"] = m.get("retool_version")
    return out


def _test_pause() -> None:
    """Test hook: seconds to sleep between a version's rename and the config and index writes (kill -9)."""
    import os
    import time

    delay = os.environ.get("RETOOL_TEST_COMMIT_DELAY_S")
    if delay:
        time.sleep(float(delay))


def config_json(text: str) -> dict:
    """A config.pbtxt as JSON (Triton's schema), the form retool.serve.tune.from_config reads."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    return json_format.MessageToDict(text_format.Parse(text, model_config_pb2.ModelConfig()),
                                     preserving_proto_field_name=True)


def _same_files(published, new) -> bool:
    """The same relative paths with the same sha256: publishing again would add nothing."""
    if not isinstance(published, Mapping) or set(published) != set(new):
        return False
    return all((published[k] or {}).get("sha256") == v["sha256"] for k, v in new.items())


def _sha(p: Path) -> str:
    from retool.fsutil import sha256_file

    return sha256_file(p)


def _load_artifact(artifact) -> ModelArtifact:
    from retool.onnx_info import artifact_from_onnx

    if isinstance(artifact, ModelArtifact):
        if artifact.format != "onnx":
            raise UsageError(f"{artifact.path}: publish takes an ONNX artifact, not {artifact.format}; "
                             f"run retool convert first")
        if not artifact.path.is_file():
            raise UsageError(f"{artifact.path}: model file not found")
        if not artifact.sha256:
            return artifact_from_onnx(artifact.path)
        return artifact
    p = Path(artifact).expanduser()
    if not p.is_file():
        raise UsageError(f"{p}: model file not found" + ("; give the .onnx file, not a folder" if p.is_dir() else ""))
    return artifact_from_onnx(p)


def _artifact_files(art: ModelArtifact) -> dict[str, Path]:
    """Repository name -> local file; external data first, the model last (commit order)."""
    from retool.fsutil import external_data_files, inside

    out: dict[str, Path] = {}
    try:
        extra = external_data_files(art.path)
    except Exception as exc:  # protobuf DecodeError and friends
        raise UsageError(f"{art.path}: not a readable ONNX model ({type(exc).__name__}); "
                         f"convert it first with 'retool convert'") from None
    for rel in extra:
        try:
            src = inside(art.path.parent, rel, where=str(art.path), allow_root=False)
        except UnsafePath:
            src = None
        if src is None or rel in (MODEL_FILE, MANIFEST):
            raise PublishError(f"{art.path}: external data location {rel!r} cannot be published (absolute, '..', "
                               f"outside the model's folder, or a reserved name); re-save the model with data "
                               f"beside it")
        if not src.is_file():
            raise UsageError(f"{art.path}: its external data file {src} is missing; keep it beside the model")
        out[Path(rel).as_posix()] = src
    out[MODEL_FILE] = art.path
    return out


def _load_report(report, art: ModelArtifact) -> tuple[Report | None, str | None]:
    from retool.onnx_info import sidecar_report_path

    if isinstance(report, Report):
        return report, "report argument"
    if report is None:
        side = sidecar_report_path(art.path)
        if not side.is_file():
            return None, None
        try:
            rep = Report.load(side)
        except (ValueError, KeyError, TypeError):
            return None, None  # a damaged sidecar is not evidence either way
        if rep.artifact is None or rep.artifact.sha256 != art.sha256:
            return None, None
        return rep, str(side)
    p = Path(report).expanduser()
    if not p.is_file():
        raise UsageError(f"{p}: report file not found; pass the report.json written by retool validate")
    try:
        return Report.load(p), str(p)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{p}: not a retool report.json ({type(exc).__name__}: {exc})") from None


def _max_batch(art: ModelArtifact, rep: Report | None, explicit: int | None) -> int:
    ins = [t.to_dict() for t in art.inputs]
    outs = [t.to_dict() for t in art.outputs]
    if not batchable(ins, outs):
        return 0
    if explicit is not None:
        return check_max_batch_size(explicit)
    # serve no larger batches than the report proved correct
    data = (rep.data or {}) if rep is not None else {}
    for key in ("parity_batch_sizes", "batch_sizes"):  # validate's: the batch sizes parity was proven at
        sizes = [int(x) for x in data.get(key) or () if str(x).isdigit() and int(x) > 0] \
            if isinstance(data.get(key), list) else []
        if sizes:
            return max(sizes)
    return DEFAULT_MAX_BATCH
