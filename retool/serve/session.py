"""A Triton to talk to: a local one started on a repository (a folder, or S3 pulled to a cache),
or an existing one given by --url. Loading a model goes through explicit model control, and a
refusal carries Triton's own reason (from the API, and from its log where only the log has it)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from retool.errors import ModelLoadError, UsageError
from retool.fsutil import inside
from retool.serve.client import Control, grpc_url_from
from retool.serve.server import TritonServer, log_errors


@dataclass
class Session:
    control: Control
    http_url: str
    grpc_url: str
    server: TritonServer | None  # None: an existing server (--url)
    repository: Path | None  # the folder the local server reads

    @property
    def backend_note(self) -> str:
        if self.server is None:
            return "existing Triton at " + self.http_url
        return ("local Triton 2.51 with retool's Python-based stand-in for the onnxruntime backend "
                "(slower than Triton's C++ backend; see docs/serving.md)")

    def load(self, name: str, config: dict | None = None, timeout: float = 120.0, version: int | None = None) -> None:
        """Load (or reload) ``name``; ModelLoadError with Triton's reason if it refuses."""
        try:
            self.control.load(name, json.dumps(config) if config else None, timeout=timeout)
        except ModelLoadError as exc:
            raise ModelLoadError(self._reason(name, str(exc))) from None
        if not self.control.ready(name, version):
            self.control.wait_ready(name, version, timeout)

    def _reason(self, name: str, api_error: str) -> str:
        """The API's words, plus the log's where they say more (some config errors are only there)."""
        text = api_error.strip()
        if self.server is not None:
            logged = [e for e in log_errors(self.server.log_text(), name) if e and e not in text]
            vague = "failed to poll" in text or "not found" in text or not text
            if logged and vague:
                text = logged[-1] if not text else f"{logged[-1]} ({text})"
        return f"Triton refused to load {name!r}: {tidy_reason(text)}"


def published_config(repo, name: str) -> dict:
    """config.pbtxt of ``name`` as JSON ({} when there is none); one line, exit 7, when it does not parse."""
    from google.protobuf import text_format

    from retool.errors import PublishError
    from retool.publish.config import config_json

    try:
        return config_json(repo.config_text(name) or "")
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise PublishError(f"{repo.storage.location(name + '/config.pbtxt')}: damaged config ({exc}); republish "
                           f"the model, or run retool repo verify") from None


def tidy_reason(text: str) -> str:
    """One readable line: no python stack of the backend, no exception class, no trailing ';'."""
    text = re.sub(r"\s+At:\s+.*$", "", text, flags=re.S)
    text = text.replace("TritonModelException: ", "").replace("Internal: ", "").replace("Invalid argument: ", "")
    text = re.sub(r"load failed for model '[^']+': (version \d+) is at UNAVAILABLE state: ", r"\1: ", text)
    return " ".join(text.split()).rstrip(";").strip()


def local_copy(repo_url: str) -> Path:
    """A folder Triton can read: the folder itself, or an fsspec repository pulled to retool's cache."""
    if "://" not in repo_url or repo_url.startswith("file://"):
        p = Path(repo_url.split("file://", 1)[-1]).expanduser()
        if not p.is_dir():
            raise UsageError(f"{repo_url}: no model repository here (not a folder); check the path or publish "
                             f"to it first")
        return p.resolve()
    from retool.publish import open_repo
    from retool.serve.home import cache_dir

    repo = open_repo(repo_url)
    dest = cache_dir() / "repos" / hashlib.sha256(repo_url.encode()).hexdigest()[:16]
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name in repo.models():
            for rel in repo.storage.files(name):
                # checked before anything is skipped or written: a key such as 'lin//tmp/x' is refused
                target = inside(tmp, f"{name}/{rel}", where=repo.storage.location(name))
                if any(seg.startswith(".") for seg in rel.split("/")):
                    continue  # staging and claims are retool's bookkeeping, not Triton's
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(repo.storage.read_bytes(f"{name}/{rel}"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


@contextlib.contextmanager
def open_session(repo_url: str | None, *, url: str | None = None, grpc_url: str | None = None,
                 startup_timeout: float = 60.0, http_port: int | None = None, grpc_port: int | None = None,
                 host: str = "127.0.0.1", log_dir=None) -> Iterator[Session]:
    """Yields a Session; a server started here is stopped on the way out, whatever happens."""
    if url:
        control = Control(url)
        if not control.live():
            from retool.errors import ServingError

            raise ServingError(f"--url {url}: no live Triton answers there (GET /v2/health/live); start it or fix "
                               f"the URL")
        yield Session(control, control.url, grpc_url_from(url, grpc_url), None, None)
        return
    if not repo_url:
        raise UsageError("give a model repository, or --url of a running Triton")
    folder = local_copy(repo_url)
    srv = TritonServer(folder, http_port=http_port, grpc_port=grpc_port, host=host,
                       startup_timeout=startup_timeout, log_dir=log_dir)
    with srv:
        yield Session(Control(srv.http_url), srv.http_url, srv.grpc_url, srv, folder)
