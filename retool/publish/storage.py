"""Where a model repository lives: a local folder, or any fsspec URL (s3://bucket/prefix ...).

Both backends publish a version the same way from the caller's side: ``stage`` the
files somewhere hidden, then ``commit`` them as version N, which fails (returns
False) when N is taken. How that is made safe differs:

- local: a lock file per model serialises allocation, and the staged folder is
  renamed into place, so a version folder appears complete or not at all;
- fsspec/S3: no rename and no locks, so a version number is claimed by creating
  ``<name>/.versions/<N>.claim`` with ``If-None-Match: *`` (exactly one writer
  wins); the staged objects are then copied to ``<name>/<N>/`` with the model
  after its external data and ``manifest.json`` last, the commit marker.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator, Mapping

from retool.errors import PublishError
from retool.procs import pid_alive
from retool.publish.storage_base import (LOCK_FILE, LOCK_TIMEOUT_S, MANIFEST, MODEL_FILE, STAGING_PREFIX, Staged,
                                         Storage, version_numbers, stage_delay, publisher_id)

__all__ = ["LOCK_FILE", "MANIFEST", "MODEL_FILE", "STAGING_PREFIX", "LocalStorage", "Staged", "Storage",
           "open_storage", "publisher_id"]


def open_storage(url: str, storage_options: Mapping | None = None) -> "Storage":
    text = str(url)
    if "://" in text and not text.startswith("file://"):
        from retool.publish.storage_fsspec import FsspecStorage

        return FsspecStorage(text, storage_options)
    return LocalStorage(text[len("file://"):] if text.startswith("file://") else text)


def _io_error(what: str, exc: OSError) -> PublishError:
    """A file-system refusal (read-only, full, ELOOP, permissions) as one line, exit 7."""
    return PublishError(f"{what} ({exc.strerror or exc}); check that the repository is writable and has free "
                        f"space")


class LocalStorage(Storage):
    def __init__(self, path: str):
        self.root = Path(path).expanduser().resolve()
        self.url = str(self.root)

    def _p(self, key: str) -> Path:
        from retool.fsutil import inside

        return inside(self.root, key, where=self.url)

    def root_exists(self) -> bool:
        return self.root.is_dir()

    def location(self, key: str) -> str:
        return str(self._p(key))

    def exists(self, key):
        return self._p(key).exists()

    def is_link(self, key):
        return self._p(key).is_symlink()

    def read_bytes(self, key):
        return self._p(key).read_bytes()

    def write_bytes(self, key, data):
        from retool.fsutil import atomic_write_text

        p = self._p(key)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _io_error(f"{p.parent}: cannot create the folder", exc) from None
        atomic_write_text(p, data.decode())

    def listdir(self, key):
        p = self._p(key)
        return sorted(x.name for x in p.iterdir()) if p.is_dir() else []

    def files(self, key):
        from retool.fsutil import inside

        p = self._p(key)
        if not p.is_dir():
            return []
        rels = sorted(str(f.relative_to(p).as_posix()) for f in p.rglob("*") if f.is_file())
        for rel in rels:  # a symlinked file that leaves the repository is refused, not followed
            inside(p, rel, where=self.url)
        return rels

    def sha256(self, key):
        from retool.fsutil import sha256_file

        return sha256_file(self._p(key))

    def sha256_many(self, keys):
        from retool.errors import UnsafePath
        from retool.fsutil import sha256_files

        out: dict = {}
        paths = {}
        for k in keys:
            try:
                paths[k] = self._p(k)
            except UnsafePath as exc:
                out[k] = exc
        out.update(zip(paths, sha256_files(list(paths.values()))))
        return out

    def size(self, key):
        return self._p(key).stat().st_size

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        from filelock import FileLock, Timeout

        folder = self._p(name)
        lock = FileLock(str(folder / LOCK_FILE), timeout=LOCK_TIMEOUT_S)
        try:  # acquired apart from the body: an OSError inside it is not a lock problem
            folder.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except Timeout:
            raise PublishError(f"{folder / LOCK_FILE}: another publisher held the lock for {LOCK_TIMEOUT_S:.0f}s; "
                               f"retry, or remove the lock file if no publisher is running") from None
        except OSError as exc:  # read-only, full, or a symlinked lock file (ELOOP)
            raise PublishError(f"{folder / LOCK_FILE}: cannot take the model's lock ({exc.strerror or exc}); the "
                               f"repository must be writable, and the lock a plain file (remove it if it is a "
                               f"link)") from None
        try:
            yield
        finally:
            lock.release()

    def stage(self, name, files):
        folder = self._p(name)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PublishError(f"{folder}: cannot create the model folder ({exc.strerror}); "
                               f"choose a writable --repo") from None
        tmp = folder / f"{STAGING_PREFIX}{publisher_id()}"
        order = []
        try:
            tmp.mkdir()
            for rel, src in files.items():
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                with open(dst, "rb+") as fh:  # durable before the rename makes it visible
                    os.fsync(fh.fileno())
                order.append(rel)
                stage_delay()
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise _io_error(f"{folder}: cannot stage the new version", exc) from None
            raise
        return Staged(name, str(tmp), tuple(order))

    def commit(self, staged, version, manifest):
        final = self._p(f"{staged.name}/{version}")
        if final.exists():
            return False
        tmp = Path(staged.key)
        try:
            with open(tmp / MANIFEST, "wb") as fh:
                fh.write(manifest)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise _io_error(f"{final}: cannot write the manifest", exc) from None
        try:
            os.rename(tmp, final)  # atomic; fails if a non-empty folder appeared meanwhile
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise PublishError(f"{final}: cannot move the staged version into place ({exc.strerror}); "
                               f"check the repository's permissions") from None
        with contextlib.suppress(OSError):  # make the rename itself durable
            fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return True

    def discard(self, staged):
        shutil.rmtree(staged.key, ignore_errors=True)

    def taken_versions(self, name):
        return version_numbers(self.listdir(name))

    def clean_stale(self, name):
        """Remove staging folders left by publishers that died (same host, dead pid), or older than a day,
        and the temporaries of atomic writes (``.config.pbtxt.*.tmp``...). Called under the model's lock,
        which every writer of the model folder holds, so any such temporary belongs to a dead writer."""
        from retool.publish.names import ascii_digits

        removed = []
        host = socket.gethostname()
        for entry in self.listdir(name):
            p = self._p(f"{name}/{entry}")
            if entry.startswith(".") and entry.endswith(".tmp") and not entry.startswith(STAGING_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    if p.is_file() and not p.is_symlink():
                        p.unlink()
                        removed.append(entry)
                continue
            if not entry.startswith(STAGING_PREFIX):
                continue
            parts = entry[len(STAGING_PREFIX):].rsplit("-", 2)  # host-pid-random
            try:
                stale = time.time() - p.stat().st_mtime > 86400
            except FileNotFoundError:
                continue
            if len(parts) == 3 and parts[0] == host and ascii_digits(parts[1]) and not pid_alive(int(parts[1])):
                stale = True
            if stale:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(entry)
        return removed
