"""A model repository at any fsspec URL (s3://bucket/prefix ...): no renames and no locks, so a version
number is claimed by creating ``<name>/.versions/<N>.claim`` with ``If-None-Match: *`` (exactly one writer
wins); the staged objects are then copied to ``<name>/<N>/`` with the model after its external data and
``manifest.json`` last, the commit marker."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import time
from typing import Mapping

from retool.errors import MissingDependency, PublishError, RetoolError, UsageError, first_line
from retool.procs import pid_alive
from retool.publish.storage_base import MANIFEST, Staged, Storage, version_numbers, stage_delay, publisher_id

#: one-line error text; this module keeps its own length limit
_first_line = functools.partial(first_line, limit=None)
_CHUNK = 1 << 20


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
                stage_delay()
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
                     and not pid_alive(int(parts[1])))
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
        return version_numbers(self.listdir(name)) | version_numbers(claims)
