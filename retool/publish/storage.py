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
import functools
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from retool.errors import MissingDependency, PublishError, RetoolError, UsageError, first_line

#: one-line error text; this module keeps its own length limit
_first_line = functools.partial(first_line, limit=None)

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
#: Hidden entries of a model folder; Triton ignores names that are not version numbers.
STAGING_PREFIX = ".staging-"
LOCK_FILE = ".retool.lock"
LOCK_TIMEOUT_S = float(os.environ.get("RETOOL_PUBLISH_LOCK_TIMEOUT", "600"))
#: Test hook: seconds to sleep after each file copied into staging (to kill a publisher mid-copy).
_DELAY_ENV = "RETOOL_TEST_STAGE_DELAY_S"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Staged:
    name: str
    key: str  # backend-specific location of the staged files
    files: tuple[str, ...]  # relative names, in commit order (model file last)


def open_storage(url: str, storage_options: Mapping | None = None) -> "Storage":
    text = str(url)
    if "://" in text and not text.startswith("file://"):
        return FsspecStorage(text, storage_options)
    return LocalStorage(text[len("file://"):] if text.startswith("file://") else text)


def publisher_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _stage_delay() -> None:
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


def _numeric(names) -> set[int]:
    """Every version number a name could claim ('01' claims 1 too: Triton would read it as 1)."""
    from retool.publish.names import MAX_VERSION, ascii_digits

    return {int(n) for n in names if ascii_digits(n) and 0 < int(n) <= MAX_VERSION}


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
                _stage_delay()
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
        return _numeric(self.listdir(name))

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
            if len(parts) == 3 and parts[0] == host and ascii_digits(parts[1]) and not _pid_alive(int(parts[1])):
                stale = True
            if stale:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(entry)
        return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def _is_remote_error(exc: BaseException) -> bool:
    mod = type(exc).__module__ or ""
    return isinstance(exc, (OSError, TimeoutError)) or mod.startswith(("botocore", "aiobotocore", "aiohttp", "s3fs"))


def _remote(keep_missing: bool = True):
    """Network, permission and bucket errors become one PublishError line; missing keys stay FileNotFoundError."""
    def deco(fn):
        @functools.wraps(fn)
        def inner(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except RetoolError:
                raise
            except FileNotFoundError as exc:
                if keep_missing:
                    raise
                raise PublishError(f"{self.url}: not found ({_first_line(exc)}); create the bucket or check the URL") from None
            except Exception as exc:
                if not _is_remote_error(exc):
                    raise
                raise PublishError(f"{self.url}: {fn.__name__.strip('_')} failed ({type(exc).__name__}: {_first_line(exc)}); "
                                   f"check the URL, credentials and AWS_ENDPOINT_URL") from None
        return inner
    return deco



class FsspecStorage(Storage):
    def __init__(self, url: str, storage_options: Mapping | None = None):
        try:
            import fsspec
        except ImportError:
            raise MissingDependency("fsspec", "s3", f"use the repository {url}") from None
        opts = dict(storage_options or {})
        if url.startswith(("s3://", "s3a://")):
            opts.setdefault("skip_instance_cache", True)
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:  # botocore reads these too; explicit keeps older versions working
                opts.setdefault("client_kwargs", {}).setdefault("endpoint_url", endpoint)
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **opts)
        except ImportError as exc:
            raise MissingDependency(getattr(exc, "name", None) or "s3fs", "s3", f"use the repository {url}") from None
        except ValueError as exc:
            raise UsageError(f"{url}: not a repository URL fsspec understands ({exc})") from None
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")
        self.protocol = url.split("://", 1)[0]

    def _p(self, key: str) -> str:
        from retool.fsutil import safe_key

        return f"{self.root}/{safe_key(key, where=self.url)}" if key else self.root

    def location(self, key):
        return f"{self.url}/{key}" if key else self.url

    def _fresh(self):
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache()

    def root_exists(self):
        self._fresh()
        try:
            return self.fs.exists(self.root) and (self.fs.isdir(self.root) or not self.fs.isfile(self.root))
        except Exception as exc:  # unreachable endpoint, no bucket, no credentials
            raise PublishError(f"{self.url}: cannot reach the repository ({type(exc).__name__}: {exc}); "
                               f"check the URL, credentials and AWS_ENDPOINT_URL") from None

    @_remote()
    def exists(self, key):
        self._fresh()
        return self.fs.exists(self._p(key))

    @_remote()
    def read_bytes(self, key):
        return self.fs.cat_file(self._p(key))

    @_remote()
    def write_bytes(self, key, data):
        self.fs.pipe_file(self._p(key), data)  # one PUT: readers see old or new, never half
        self._fresh()

    @_remote()
    def listdir(self, key):
        self._fresh()
        try:
            entries = self.fs.ls(self._p(key), detail=False)
        except FileNotFoundError:
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})

    @_remote()
    def files(self, key):
        self._fresh()
        base = self._p(key).rstrip("/") + "/"
        try:
            found = self.fs.find(self._p(key))
        except FileNotFoundError:
            return []
        from retool.fsutil import safe_key

        rels = sorted(f[len(base):] for f in found if f.startswith(base))
        for rel in rels:  # 'lin//tmp/x' lists as '/tmp/x': refused here, before any caller joins it
            safe_key(rel, where=self.location(key))
        return rels

    @_remote()
    def sha256(self, key):
        import hashlib

        h = hashlib.sha256()
        with self.fs.open(self._p(key), "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    @_remote()
    def size(self, key):
        return int(self.fs.size(self._p(key)))

    @contextlib.contextmanager
    def lock(self, name):
        yield  # no locks on object stores: version claims are conditional creates instead

    @_remote(keep_missing=False)
    def create_exclusive(self, key: str, data: bytes) -> bool:
        path = self._p(key)
        try:
            if self.protocol in ("s3", "s3a"):
                self.fs.pipe_file(path, data, mode="create")
            else:
                with self.fs.open(path, "xb") as fh:
                    fh.write(data)
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError, TypeError) as exc:
            raise PublishError(f"{self.url}: this storage cannot create objects exclusively ({exc}), so concurrent "
                               f"publishers could collide; use a local folder or s3://") from None
        finally:
            self._fresh()
        return True

    @_remote(keep_missing=False)
    def stage(self, name, files):
        key = f"{name}/.staging/{publisher_id()}"
        order = []
        try:
            for rel, src in files.items():
                self.fs.put_file(str(src), self._p(f"{key}/{rel}"))
                order.append(rel)
                _stage_delay()
        except BaseException:
            self.discard(Staged(name, key, tuple(order)))
            raise
        return Staged(name, key, tuple(order))

    @_remote(keep_missing=False)
    def commit(self, staged, version, manifest):
        if self.exists(f"{staged.name}/{version}"):
            return False
        import hashlib

        claim = json.dumps({"claimed_by": staged.key.rsplit("/", 1)[-1], "at": time.time(),
                            "manifest_sha256": hashlib.sha256(manifest).hexdigest()}).encode()
        if not self.create_exclusive(f"{staged.name}/.versions/{version}.claim", claim):
            return False
        for rel in staged.files:  # model file is last in staged.files: Triton never sees it without its data
            self.fs.copy(self._p(f"{staged.key}/{rel}"), self._p(f"{staged.name}/{version}/{rel}"))
        self.fs.pipe_file(self._p(f"{staged.name}/{version}/{MANIFEST}"), manifest)
        self._fresh()
        return True

    def discard(self, staged):
        with contextlib.suppress(Exception):
            self.fs.rm(self._p(staged.key), recursive=True)
        self._fresh()

    @_remote()
    def clean_stale(self, name):
        """Remove staged uploads of publishers that died (same host, dead pid) or are over a day old."""
        removed = []
        host = socket.gethostname()
        for entry in self.listdir(f"{name}/.staging"):
            parts = entry.rsplit("-", 2)  # host-pid-random
            stale = (len(parts) == 3 and parts[0] == host and parts[1].isascii() and parts[1].isdigit()
                     and not _pid_alive(int(parts[1])))
            if not stale:
                with contextlib.suppress(Exception):
                    infos = self.fs.find(self._p(f"{name}/.staging/{entry}"), detail=True).values()
                    newest = max(i["LastModified"].timestamp() for i in infos)
                    stale = time.time() - newest > 86400
            if stale:
                self.discard(Staged(name, f"{name}/.staging/{entry}", ()))
                removed.append(entry)
        return removed

    def version_record(self, name, version):
        try:
            return str(self.read_json(f"{name}/.versions/{int(version)}.claim").get("manifest_sha256") or "") or None
        except (FileNotFoundError, ValueError, AttributeError):
            return None

    @_remote()
    def taken_versions(self, name):
        claims = {n.split(".", 1)[0] for n in self.listdir(f"{name}/.versions")}
        return _numeric(self.listdir(name)) | _numeric(claims)
