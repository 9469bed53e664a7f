"""Talk to a Triton: the repository/model control API over HTTP (KServe v2 + Triton extensions),
and inference through Triton's own clients (tritonclient.http and tritonclient.grpc)."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Mapping

import numpy as np

from retool.errors import ModelLoadError, ServingError, ServingTimeout, UsageError


def normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def check_url(url: str, flag: str = "--url") -> str:
    """An HTTP(S) URL with a host and, if any, a numeric port: else one line, exit 2 (not a traceback)."""
    from urllib.parse import urlsplit

    full = normalise_url(str(url))
    try:
        parts = urlsplit(full)
        port = parts.port  # ValueError for ':abc' or out of range
    except ValueError as exc:
        raise UsageError(f"{flag} {url}: not a valid URL ({exc}); give one such as http://localhost:8000") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{flag} {url}: give an http:// URL with a host, such as http://localhost:8000")
    if port == 0:
        raise UsageError(f"{flag} {url}: port 0 is not a port a server listens on; give one such as 8000")
    return full


class Control:
    """The HTTP control endpoints of one server."""

    def __init__(self, http_url: str, timeout: float = 120.0):
        self.url = check_url(http_url)
        self.timeout = timeout

    def _call(self, method: str, path: str, body: Mapping | None = None, timeout: float | None = None):
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        timeout = self.timeout if timeout is None else timeout  # an explicit 0 is not 'the default'
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else {})
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, {"error": raw.decode(errors="replace")}
        except (TimeoutError, urllib.error.URLError) as exc:
            if isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError):
                raise ServingTimeout(f"{self.url}{path}: no answer within {timeout:g} s") from None
            raise ServingError(f"{self.url}: cannot reach Triton ({getattr(exc, 'reason', exc)}); is the server "
                               f"running?") from None
        except (ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServingError(f"{self.url}: cannot reach Triton ({reason}); is the server running?") from None

    def live(self) -> bool:
        try:
            return self._call("GET", "/v2/health/live", timeout=5)[0] == 200
        except ServingError:
            return False

    def server_metadata(self) -> dict:
        return self._call("GET", "/v2")[1]

    def index(self) -> list[dict]:
        code, body = self._call("POST", "/v2/repository/index", {})
        if code != 200:
            raise ServingError(f"{self.url}: repository index failed: {body.get('error', body)}")
        return list(body)

    def load(self, name: str, config: str | None = None, timeout: float | None = None) -> None:
        """Explicit model control (the call returns once loaded); ModelLoadError with Triton's reason."""
        body = {"parameters": {"config": config}} if config else {}
        timeout = self.timeout if timeout is None else timeout
        try:
            code, out = self._call("POST", f"/v2/repository/models/{name}/load", body, timeout=timeout)
        except ServingTimeout:
            raise ServingTimeout(f"model {name!r} was not ready on {self.url} within {timeout:g} s; "
                                 f"raise --timeout or look at the server log") from None
        if code != 200:
            raise ModelLoadError(str(out.get("error", out)))

    def unload(self, name: str) -> None:
        self._call("POST", f"/v2/repository/models/{name}/unload", {"parameters": {"unload_dependents": True}})

    def ready(self, name: str, version: int | None = None) -> bool:
        v = f"/versions/{version}" if version else ""
        return self._call("GET", f"/v2/models/{name}{v}/ready", timeout=5)[0] == 200

    def wait_ready(self, name: str, version: int | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready(name, version):
            if time.monotonic() > deadline:
                raise ServingTimeout(f"model {name!r}{f' version {version}' if version else ''} was not ready on "
                                     f"{self.url} within {timeout:.0f} s; raise --timeout or look at the server log")
            time.sleep(0.2)

    def config(self, name: str) -> dict:
        code, body = self._call("GET", f"/v2/models/{name}/config")
        if code != 200:
            raise ModelLoadError(f"{name}: Triton has no config for it: {body.get('error', body)}")
        return body

    def metadata(self, name: str) -> dict:
        return self._call("GET", f"/v2/models/{name}")[1]

    def stats(self, name: str) -> dict:
        return self._call("GET", f"/v2/models/{name}/stats")[1]


def _np_to_triton(dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(np.dtype(dtype))


class InferClient:
    """One connection to a server over ``protocol`` (http or grpc), for many requests (a decode loop)."""

    def __init__(self, protocol: str, url: str, timeout: float = 60.0):
        try:
            if protocol == "http":
                import tritonclient.http as tc
            else:
                import tritonclient.grpc as tc
        except ImportError as exc:  # tritonclient.http needs geventhttpclient
            from retool.errors import MissingDependency

            raise MissingDependency(f"tritonclient ({exc})", "serve", f"send requests over {protocol}") from None
        self.protocol, self.timeout, self._tc = protocol, timeout, tc
        host = normalise_url(url).split("://", 1)[1] if protocol == "http" else url
        self.client = tc.InferenceServerClient(host)

    def infer(self, name: str, inputs: Mapping[str, np.ndarray], outputs: list[str],
              version: int | None = None) -> dict[str, np.ndarray]:
        from tritonclient.utils import InferenceServerException

        tc = self._tc
        ins = []
        for n, arr in inputs.items():
            i = tc.InferInput(n, list(arr.shape), _np_to_triton(arr.dtype))
            i.set_data_from_numpy(np.ascontiguousarray(arr))
            ins.append(i)
        outs = [tc.InferRequestedOutput(o) for o in outputs]
        kw: dict[str, Any] = {"model_version": str(version)} if version else {}
        if self.protocol == "http":
            kw["timeout"] = int(self.timeout)
        else:
            kw["client_timeout"] = self.timeout
        try:
            res = self.client.infer(name, ins, outputs=outs, **kw)
        except InferenceServerException as exc:
            raise ServingError(f"{name}: inference over {self.protocol} failed: {exc.message()}") from None
        return {o: res.as_numpy(o) for o in outputs}

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "InferClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def infer(protocol: str, url: str, name: str, inputs: Mapping[str, np.ndarray], outputs: list[str],
          version: int | None = None, timeout: float = 60.0) -> dict[str, np.ndarray]:
    """One request over ``protocol`` (http or grpc) with Triton's own client library."""
    with InferClient(protocol, url, timeout) as client:
        return client.infer(name, inputs, outputs, version)


def grpc_url_from(http_url: str, grpc_url: str | None) -> str:
    """The gRPC address for an existing server: given, or the HTTP host with Triton's default port 8001."""
    if grpc_url:
        addr = grpc_url.split("://", 1)[-1]
        check_url(addr, "--grpc-url")
        return addr
    from urllib.parse import urlsplit

    host = urlsplit(check_url(http_url)).hostname
    return f"[{host}]:8001" if ":" in host else f"{host}:8001"
