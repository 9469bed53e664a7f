"""verify and diff: a repository against its manifests and its index."""
from __future__ import annotations

import json
from typing import Any, Mapping

from retool.errors import PublishError, UnsafePath
from retool.publish import index, regression
from retool.publish.finding import Finding  # noqa: F401  (re-exported: verify's findings)
from retool.publish.config import parse_with_triton_schema
from retool.publish.names import ALIASES, CONFIG, check_version
from retool.publish.storage import MANIFEST

SIGNATURE = "model.sig"  # retool.publish.signing.SIGNATURE (that module imports model-signing lazily)


class Checks:
    """Mixed into Repository."""

    # ---- checking ----------------------------------------------------------------------------------------
    def verify_version(self, name: str, version: int, digests: dict | None = None) -> list[Finding]:
        """The version's files against its manifest; ``digests`` (when given) gets the sha256 computed for each
        file (relative name -> hex), so a signature check can use them instead of reading the bytes again."""
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
        present = set(self.storage.files(base)) - {MANIFEST, SIGNATURE}  # model.sig: checked by signing.py
        hashed = self.storage.sha256_many([f"{base}/{rel}" for rel in sorted(listed) if rel in present])
        for rel, meta in sorted(listed.items()):
            if rel not in present:
                out.append(Finding(name, version, loc(f"{base}/{rel}"), "missing"))
                continue
            digest = hashed[f"{base}/{rel}"]
            if isinstance(digest, UnsafePath):
                out.append(Finding(name, version, loc(base), "unsafe-path", str(digest)))
                continue
            if digests is not None:
                digests[rel] = digest  # what the bytes hash to now, not what the manifest claims
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

    def verify(self, name: str | None = None, digests: dict | None = None) -> tuple[list[Finding], int]:
        """Recompute every hash. Returns (findings, number of files checked). ``digests`` (when given) gets each
        version folder's computed sha256s: {"<name>/<version>": {relative name: hex}}."""
        names = [self.require_model(name)] if name else self.models()
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
                findings += self.verify_version(n, v, None if digests is None else digests.setdefault(f"{n}/{v}", {}))
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
        name = self.require_model(name)
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

