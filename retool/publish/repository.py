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
from retool.procs import clean_dead_temp, temp_dir
from retool.publish import index, regression
from retool.publish.config import DEFAULT_MAX_BATCH, batchable
from retool.publish.manifest import build_manifest, publisher
from retool.publish.names import (ALIASES, CONFIG, SERVING, ascii_digits, check_alias, check_instances,
                                  check_max_batch_size, check_model_name, check_version, triton_reads_as_version,
                                  version_of)
from retool.publish.checks import Checks, Finding
from retool.publish.config import config_json  # noqa: F401  (re-exported)
from retool.publish.revision import ServingState
from retool.publish.storage import MANIFEST, MODEL_FILE, Storage, open_storage
from retool.types import CheckResult, ModelArtifact, Report, now_iso

__all__ = ["ALIASES", "CONFIG", "SERVING", "Finding", "PublishResult", "Repository", "config_json", "open_repo"]


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
                       "unchanged": self.unchanged, "configured": self.configured,
                       "forced_reasons": list(self.manifest.get("forced_reasons", ())),
                       "files": self.manifest.get("files"), "published": self.manifest.get("published")})


def open_repo(url, storage_options: Mapping | None = None, signer=None) -> "Repository":
    """``signer``: a :class:`retool.publish.signing.Signer`; every write of a model is then signed."""
    repo = Repository(open_storage(str(url), storage_options))
    repo.signer = signer
    return repo


class Repository(ServingState, Checks):
    signer = None  # retool.publish.signing.Signer: sign each version and the model's state (config.sig)

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

    def require_model(self, name: str) -> str:
        """``name``, checked and known to the repository; else a UsageError listing the models."""
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
        """Entries Triton would read as a version -> 'ok', 'non-canonical' ('01', '1.bak') or 'symlink'."""
        out = {}
        for k in self.storage.listdir(name):
            if triton_reads_as_version(k):
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
        clean_dead_temp()  # what publishes killed with SIGKILL left
        tmp_samples = temp_dir("samples")
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
                    if self.signer is not None:  # signed before it is visible; the signature travels with it
                        from retool.publish.signing import sign_version

                        # the sha256s the manifest records, computed above: the files are not hashed again
                        staged = sign_version(store, staged, files, mbytes, self.signer,
                                              {rel: f["sha256"] for rel, f in info.items()})
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
        name = self.require_model(name)
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
        name = self.require_model(name)
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

def _test_pause() -> None:
    """Test hook: seconds to sleep between a version's rename and the config and index writes (kill -9)."""
    import os
    import time

    delay = os.environ.get("RETOOL_TEST_COMMIT_DELAY_S")
    if delay:
        time.sleep(float(delay))


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
