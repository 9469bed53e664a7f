"""The model's index, ``<repo>/<name>/history.json``: what retool last wrote, so verify can tell its own
writes from anyone else's.

It records the sha256 of config.pbtxt, where each alias points, the sha256 of each version's
manifest (added once, by the publish that made the version) and the history of every change
(publish, promote, rollback, configure). Every writer updates it under the model's lock, after
the files it describes. A writer killed half way leaves ``pending``; verify then accepts the
state before or after that step, and the next writer finishes it (``recover``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from retool.errors import PublishError

if TYPE_CHECKING:  # pragma: no cover
    from retool.publish.finding import Finding
    from retool.publish.repository import Repository

INDEX = "history.json"
KIND = "retool-model-index"


def empty() -> dict:
    return {"kind": KIND, "schema": 1, "config_sha256": None, "aliases": {}, "versions": {}, "history": []}


def read(repo: "Repository", name: str) -> dict | None:
    """The index, or None when there is none; PublishError when it is damaged."""
    key = f"{name}/{INDEX}"
    try:
        data = repo.storage.read_json(key)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise PublishError(f"{repo.storage.location(key)}: damaged index ({exc}); restore it from a backup") from None
    if not isinstance(data, dict) or data.get("kind") != KIND or not isinstance(data.get("versions"), dict) \
            or not isinstance(data.get("aliases"), dict) or not isinstance(data.get("history"), list):
        raise PublishError(f"{repo.storage.location(key)}: not a retool model index; restore it from a backup")
    return data


def write(repo: "Repository", name: str, idx: dict) -> None:
    repo.storage.write_json(f"{name}/{INDEX}", idx)


def alias_map(aliases: dict) -> dict[str, int]:
    return {a: int(e.get("version", -1)) for a, e in sorted(aliases.items()) if isinstance(e, dict)}


def manifest_sha(repo: "Repository", name: str, version: int) -> str:
    return repo.storage.sha256(f"{name}/{version}/manifest.json")


def adopt(repo: "Repository", name: str) -> dict:
    """An index for a model published before retool kept one: today's state, taken as it is."""
    from retool.fsutil import sha256_bytes
    from retool.publish.manifest import publisher
    from retool.types import now_iso

    idx = empty()
    idx["versions"] = {str(v): manifest_sha(repo, name, v) for v in repo.versions(name)}
    idx["aliases"] = alias_map(repo.aliases(name))
    text = repo.config_text(name)
    idx["config_sha256"] = sha256_bytes(text.encode()) if text is not None else None
    if idx["versions"] or text is not None:  # a model from before the index, not a first publish
        who = publisher()
        idx["history"].append({"event": "adopted", "at": now_iso(), "by": who["user"], "host": who["host"],
                               "note": "index started from the repository as found"})
    return idx


def check(repo: "Repository", name: str, folders: dict[str, str], committed: list[int]) -> list["Finding"]:
    """What verify adds to the file hashes: the index against the repository.

    ``folders``: each entry of the model folder that looks like a version (ASCII digits) -> 'ok',
    'non-canonical' or 'symlink'."""
    from retool.fsutil import sha256_bytes
    from retool.publish.config import parse_with_triton_schema
    from retool.publish.finding import Finding
    from retool.publish.names import ALIASES, CONFIG

    loc = repo.storage.location
    out: list[Finding] = []
    for k, kind in sorted(folders.items()):
        if kind == "symlink":
            out.append(Finding(name, None, loc(f"{name}/{k}"), "symlinked",
                               "a version folder is a symbolic link; Triton would serve whatever it points at; "
                               "remove the link"))
        elif kind == "non-canonical":
            out.append(Finding(name, None, loc(f"{name}/{k}"), "bad-version-folder",
                               f"{k!r} is not a canonical version number, yet Triton reads it as one (or fails "
                               f"on it); remove or rename it"))
    try:
        idx = read(repo, name)
    except PublishError as exc:
        return out + [Finding(name, None, loc(f"{name}/{INDEX}"), "bad-index", str(exc))]
    if idx is None:
        if committed:
            out.append(Finding(name, None, loc(f"{name}/{INDEX}"), "missing",
                               "no index of what retool wrote (deleted, or published by an older retool); the "
                               "next promote or configure records one from the repository as it is"))
        return out
    pending = idx.get("pending") or {}
    pending_v = pending.get("version")
    known = idx["versions"]
    for v in committed:
        want = known.get(str(v)) or repo.storage.version_record(name, v)
        if want is None:
            if v != pending_v:
                out.append(Finding(name, v, loc(f"{name}/{v}"), "added",
                                   "a version retool did not publish (copied or renamed into the repository)"))
            continue
        got = manifest_sha(repo, name, v)
        if got != want:
            out.append(Finding(name, v, loc(f"{name}/{v}/manifest.json"), "changed",
                               f"manifest sha256 {got[:12]}… but the index recorded {want[:12]}… at publish"))
    for k in sorted(set(known) - {str(v) for v in committed}, key=lambda x: (len(x), x)):
        out.append(Finding(name, int(k) if k.isascii() and k.isdigit() else None, loc(f"{name}/{k}"), "missing",
                           "a published version is gone"))
    if pending:  # an interrupted write: the state before or after it is fine; the next writer finishes it
        return out
    text = repo.config_text(name)
    if text is not None and committed:
        got = sha256_bytes(text.encode())
        try:
            expected = repo.render_config(name)
        except (PublishError, KeyError, TypeError, ValueError):  # a damaged manifest or alias file: reported apart
            expected = None
        diff = _config_diff(text, expected, parse_with_triton_schema)
        if got != idx.get("config_sha256"):
            out.append(Finding(name, None, loc(f"{name}/{CONFIG}"), "changed",
                               "config.pbtxt was edited outside retool (sha256 differs from the index)"
                               + (f"; differs in {diff}" if diff else "")
                               + "; run retool repo configure to regenerate it"))
        elif diff:
            out.append(Finding(name, None, loc(f"{name}/{CONFIG}"), "bad-config",
                               f"config.pbtxt does not match the manifest, aliases and serving profiles ({diff}); "
                               f"one of those was edited outside retool"))
    try:
        als = alias_map(repo.aliases(name))
    except PublishError:
        als = None  # verify reports the damaged file itself
    if als is not None and als != idx["aliases"]:
        moved = [f"{a}: {als.get(a)} (index: {idx['aliases'].get(a)})"
                 for a in sorted(set(als) | set(idx["aliases"])) if als.get(a) != idx["aliases"].get(a)]
        out.append(Finding(name, None, loc(f"{name}/{ALIASES}"), "bad-alias",
                           "aliases moved outside retool: " + ", ".join(moved)))
    return out


def _config_diff(text: str, expected: str | None, parse) -> str:
    """The top-level fields in which two configs differ, by Triton's schema ('' when equal or unknowable)."""
    if expected is None:
        return ""
    try:
        a, b = parse(text), parse(expected)
    except Exception:  # noqa: BLE001 - verify reports an unparsable config on its own
        return ""
    if a is None or b is None:  # no tritonclient: compare the text
        return "" if text == expected else "its text"
    fields = sorted({f.name for f, _ in a.ListFields()} | {f.name for f, _ in b.ListFields()})
    return ", ".join(f for f in fields if getattr(a, f) != getattr(b, f))


def event(kind: str, **fields: Any) -> dict:
    from retool.publish.manifest import publisher
    from retool.types import now_iso

    who = publisher()
    return {"event": kind, "at": now_iso(), "by": who["user"], "host": who["host"], **fields}
