"""Content-addressed step cache: a step is skipped when the hash of its inputs
(file hashes plus parameters) matches a recorded run whose outputs are intact."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Mapping

from retool import __version__
from retool.fsutil import atomic_write_text, sha256_file
from retool.types import jsonable


def digest_of_source(source: str, base: Path) -> str:
    """Hash of what a model source is: the file/folder, or the module file of a callable."""
    p = Path(source) if Path(source).is_absolute() else base / source
    if p.exists():
        return sha256_file(p)
    mod = source.rpartition(":")[0]
    if mod.endswith(".py"):
        f = Path(mod) if Path(mod).is_absolute() else base / mod
        return sha256_file(f) if f.exists() else hashlib.sha256(source.encode()).hexdigest()
    try:
        spec = importlib.util.find_spec(mod)
    except (ImportError, ValueError):
        spec = None
    if spec and spec.origin and Path(spec.origin).exists():
        return hashlib.sha256(source.encode() + bytes.fromhex(sha256_file(spec.origin))).hexdigest()
    return hashlib.sha256(source.encode()).hexdigest()


def digest_of_path(path: str | None, base: Path) -> str | None:
    if not path:
        return None
    p = Path(path) if Path(path).is_absolute() else base / path
    return sha256_file(p) if p.exists() else f"missing:{path}"


def step_key(stage: str, inputs: Mapping[str, Any]) -> str:
    blob = json.dumps({"stage": stage, "retool": __version__, **jsonable(dict(inputs))}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class StepCache:
    def __init__(self, root: Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled
        if enabled:
            self.root.mkdir(parents=True, exist_ok=True)

    def _entry(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The recorded result, if every output file it lists is still there with the same hash."""
        if not self.enabled or not self._entry(key).exists():
            return None
        try:
            rec = json.loads(self._entry(key).read_text())
        except ValueError:
            return None
        for path, digest in rec.get("outputs", {}).items():
            if not Path(path).exists() or sha256_file(path) != digest:
                return None
        return rec

    def put(self, key: str, result: Mapping[str, Any], outputs: list[str]) -> None:
        if not self.enabled:
            return
        rec = {"result": jsonable(dict(result)), "outputs": {str(p): sha256_file(p) for p in outputs if Path(p).exists()}}
        atomic_write_text(self._entry(key), json.dumps(rec, indent=1))
