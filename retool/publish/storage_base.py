"""What every model-repository storage shares: the operations (``Storage``), a staged version
(``Staged``), the names retool keeps in a version folder, and who is publishing (``publisher_id``).
The backends are storage.py (a local folder) and storage_fsspec.py (S3 and other fsspec URLs)."""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
#: Hidden entries of a model folder; Triton ignores names that are not version numbers.
STAGING_PREFIX = ".staging-"
LOCK_FILE = ".retool.lock"
LOCK_TIMEOUT_S = float(os.environ.get("RETOOL_PUBLISH_LOCK_TIMEOUT", "600"))
#: Test hook: seconds to sleep after each file copied into staging (to kill a publisher mid-copy).
_DELAY_ENV = "RETOOL_TEST_STAGE_DELAY_S"


@dataclass(frozen=True)
class Staged:
    name: str
    key: str  # backend-specific location of the staged files
    files: tuple[str, ...]  # relative names, in commit order (model file last)


def publisher_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def stage_delay() -> None:
    delay = os.environ.get(_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


class Storage:
    """The few operations a model repository needs. Keys are '/'-joined, relative to the root."""

    url: str

    def exists(self, key: str) -> bool: raise NotImplementedError
    def read_bytes(self, key: str) -> bytes: raise NotImplementedError
    def write_bytes(self, key: str, data: bytes) -> None: raise NotImplementedError
    def listdir(self, key: str) -> list[str]: raise NotImplementedError
    def files(self, key: str) -> list[str]: raise NotImplementedError
    def sha256(self, key: str) -> str: raise NotImplementedError

    def sha256_many(self, keys) -> dict:
        """{key: sha256 hex, or the UnsafePath that refused the key}: verify's one pass over a version."""
        from retool.errors import UnsafePath

        out: dict = {}
        for k in keys:
            try:
                out[k] = self.sha256(k)
            except UnsafePath as exc:
                out[k] = exc
        return out

    def size(self, key: str) -> int: raise NotImplementedError
    def location(self, key: str) -> str: raise NotImplementedError
    def lock(self, name: str): raise NotImplementedError
    def stage(self, name: str, files: Mapping[str, Path]) -> Staged: raise NotImplementedError
    def commit(self, staged: Staged, version: int, manifest: bytes) -> bool: raise NotImplementedError
    def discard(self, staged: Staged) -> None: raise NotImplementedError
    def taken_versions(self, name: str) -> set[int]: raise NotImplementedError
    def clean_stale(self, name: str) -> list[str]: return []
    def is_link(self, key: str) -> bool: return False

    def version_record(self, name: str, version: int) -> str | None:
        """The manifest sha256 recorded, once and by one writer, when ``version`` was committed (object
        stores, where the model's index cannot be updated under a lock); None where there is none."""
        return None

    def read_json(self, key: str):
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, obj) -> None:
        self.write_bytes(key, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def root_exists(self) -> bool: raise NotImplementedError


def version_numbers(names) -> set[int]:
    """Every version number a name could claim ('01' claims 1 too: Triton would read it as 1)."""
    from retool.publish.names import MAX_VERSION, ascii_digits

    return {int(n) for n in names if ascii_digits(n) and 0 < int(n) <= MAX_VERSION}
