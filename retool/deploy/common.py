"""What the KServe and raw manifests share: names, quantities, the replica rule, the output folder."""
from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

from retool.errors import UsageError

#: maxReplicas = MAX_FACTOR x the plan's replicas: the plan's count already holds the peak rate with
#: headroom, so the extra covers traffic above the stated peak and replicas lost to a rollout.
MAX_FACTOR = 2
#: Triton 2.51 (the server retool tests against) is NGC release 24.10.
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def resource_name(name: str, flag: str = "NAME") -> str:
    """A DNS-1035 label (what InferenceService and Service names must be): lowercased, '_' and '.' to '-'."""
    out = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not _DNS1035.fullmatch(out or ""):
        raise UsageError(f"{flag} {name!r}: cannot be a Kubernetes name (lowercase letters, digits and '-', "
                         f"starting with a letter, at most 63); pass --name")
    return out


def max_replicas(replicas: int, explicit: int | None = None) -> int:
    if explicit is not None:
        if explicit < replicas:
            raise UsageError(f"--max-replicas {explicit}: below the plan's {replicas} replicas; give at least "
                             f"{replicas}")
        return explicit
    return MAX_FACTOR * replicas


def cpu_quantity(cpu: float) -> str:
    return str(int(cpu)) if float(cpu).is_integer() else f"{math.ceil(cpu * 1000)}m"


def memory_quantity(n: int) -> str:
    """Exact binary units when they fit (512Mi), else bytes."""
    for unit, size in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def parse_quantity(q) -> float:
    """A Kubernetes quantity as a number (cores or bytes), for tests and read-back."""
    s = str(q)
    units = {"m": 1e-3, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 1e3, "M": 1e6, "G": 1e9}
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            return float(s[: -len(u)]) * units[u]
    return float(s)


def resources(plan) -> dict:
    """Requests = limits (Guaranteed QoS: the plan's p99 was measured on whole, unshared cores)."""
    r = {"cpu": cpu_quantity(plan.cpu), "memory": memory_quantity(plan.memory_bytes)}
    return {"requests": dict(r), "limits": dict(r)}


def is_remote(url: str) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def check_repository(repo: str, plan) -> None:
    """REPO must be the plan's repository (local paths compared resolved)."""
    def norm(u):
        u = str(u)
        if is_remote(u):
            return u.rstrip("/")
        return str(Path(u[len("file://"):] if u.startswith("file://") else u).expanduser().resolve())
    if norm(repo) != norm(plan.repository):
        raise UsageError(f"{plan.path}: the plan is for the repository {plan.repository}, not {repo}; "
                         f"pass that REPO or plan again for this one")


def check_name(name: str, plan) -> None:
    if name not in (plan.model, plan.get("family")):
        raise UsageError(f"{plan.path}: the plan is for {plan.get('family')!r} (serving {plan.model!r}), not "
                         f"{name!r}; pass that NAME or plan again for {name!r}")


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: exists and is not a folder; choose another -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"-o {out}: folder is not empty; pass --force to replace what is in it, or choose "
                         f"another -o")
    if not out.parent.expanduser().resolve().is_dir():
        raise UsageError(f"-o {out}: parent folder {out.parent} does not exist; create it first")


def write_folder(out: Path, files: dict[str, str | bytes], force: bool) -> list[Path]:
    """Write ``files`` (name -> content) as the folder ``out``, all or nothing: a staging folder
    beside it is renamed into place; an existing folder is replaced only with ``force``."""
    from retool.fsutil import inside, staging_dir

    out = Path(out).expanduser()
    check_out(out, force)
    with staging_dir(out) as tmp:
        stage = tmp / "out"
        stage.mkdir()
        for rel, content in files.items():
            p = inside(stage, rel)
            p.parent.mkdir(parents=True, exist_ok=True)
            (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
        old = None
        if out.exists():
            old = tmp / "old"
            os.replace(out, old)
        try:
            os.replace(stage, out)
        except OSError as exc:
            if old is not None:
                os.replace(old, out)
            raise UsageError(f"-o {out}: could not be written ({exc.strerror or exc}); choose another -o") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return [out / rel for rel in files]
