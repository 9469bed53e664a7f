"""The model-level state retool writes beside the versions: config.pbtxt, the serving profiles applied
after publish (config revisions, ``retool repo configure``) and the index that records both."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from retool.errors import PublishError, UsageError
from retool.publish import index
from retool.publish.config import build_config, config_json
from retool.publish.manifest import publisher
from retool.publish.names import CONFIG, SERVING, check_instances, check_version
from retool.types import now_iso


class ServingState:
    """Mixed into Repository: everything that (re)writes config.pbtxt, always followed by the index."""

    def _index(self, name: str) -> dict:
        idx = index.read(self, name)
        return idx if idx is not None else index.adopt(self, name)

    def indexed_versions(self, name: str) -> set[str]:
        """The versions the index records (empty when it is missing or damaged: verify reports that)."""
        try:
            return set((index.read(self, name) or {}).get("versions", {}))
        except PublishError:
            return set()

    def record(self, name: str, kind: str, **fields) -> None:
        """An event in the model's history, committed with the state it describes (config.sig too)."""
        self._commit_state(name, index.event(kind, **fields))

    def _recover(self, name: str) -> None:
        """Finish what a killed writer left pending (under the lock). Every writer calls it first."""
        from retool.publish.signing import check_writer

        check_writer(self, name)
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
                                   "completed": now_iso()})
        idx["aliases"] = index.alias_map(self.aliases(name))
        idx["config_sha256"] = sha256_bytes(text.encode()) if text is not None else idx.get("config_sha256")
        if event:
            idx["history"].append({**event, "config_sha256": idx["config_sha256"]})
        index.write(self, name, idx)
        if getattr(self, "signer", None) is not None:  # config, aliases, profiles and index: signed together
            from retool.publish.signing import sign_model

            sign_model(self, name)
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
        from retool.serve.profile import load_profile

        name = self.require_model(name)
        where = profile if isinstance(profile, (str, Path)) else "serving profile"
        prof = load_profile(profile)  # bad input is refused before anything is locked or written
        version = None if version is None else check_version(version)
        with self.storage.lock(name):
            self.storage.clean_stale(name)
            self._recover(name)
            committed = self.versions(name)
            if version is None:
                if not committed:
                    raise UsageError(f"{self.storage.location(name)}: no published version to configure")
                served = [v for v in index.alias_map(self.aliases(name)).values() if v in committed]
                version = max(served) if served else committed[-1]
            return self._configure_locked(name, version, prof, where)

    def _configure_locked(self, name: str, version: int, profile, where=None) -> dict:
        from retool.serve.profile import load_profile, serving_settings

        if version not in self.versions(name):
            have = ", ".join(map(str, self.versions(name))) or "none"
            raise UsageError(f"{self.storage.location(name)}: no version {version} to apply a serving profile to "
                             f"(versions: {have})")
        where = where or (profile if isinstance(profile, (str, Path)) else "serving profile")
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
        idx = index.read(self, self.require_model(name))
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

        name = self.require_model(name)
        v = check_version(version) if version is not None else self.versions(name)[-1]
        m = self.manifest(name, v)
        t = dict(m.get("triton") or {})
        t = dict(t.get("default") or t) if "serving_profile" in t or "default" in t else t
        text = build_config(name, m["artifact"], max_batch_size=t.get("max_batch_size"),
                            instance_count=t.get("instance_count", 1), dynamic_batching=True,
                            parameters=t.get("parameters"))
        return from_config(config_json(text))
