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


def published_check(repo_url: str, plan) -> list[str]:
    """For a local REPO: the plan's model and version must be published (UsageError otherwise); returns
    warnings where the repository would not serve what the plan measured (another version served,
    config.pbtxt differing from the plan's configuration). A remote REPO is not contacted here."""
    threads = []
    if plan.chosen["config"].get("intra_op_thread_count") is None:
        threads = [f"warning: the plan leaves intra_op_thread_count to ONNX Runtime's default, one thread per core "
                   f"it sees; in a pod that is the node's cores, not the {cpu_quantity(plan.cpu)}-CPU limit: set it "
                   f"to {max(1, int(plan.cpu))} in {plan.model}/config.pbtxt before deploying"]
    if is_remote(repo_url):
        return threads + [f"note: {repo_url} was not read here; the cluster must find {plan.model} v{plan.chosen['version']} "
                f"there, configured as the plan says"]
    from retool.publish import open_repo

    repo = open_repo(repo_url)
    if plan.model not in repo.models():
        raise UsageError(f"{repo_url}: no model {plan.model!r} (the plan's choice); publish it there or pass the "
                         f"repository the plan was made on")
    versions = repo.versions(plan.model)
    v = int(plan.chosen["version"])
    if v not in versions:
        raise UsageError(f"{repo_url}: {plan.model} has no version {v} (the plan's; published: "
                         f"{', '.join(map(str, versions)) or 'none'}); plan again on this repository")
    cfg = _config(repo, plan.model)
    if cfg is None:
        return threads
    warnings = threads
    policy = cfg.get("version_policy") or {}
    served = ([int(x) for x in policy["specific"].get("versions", [])] if "specific" in policy
              else versions if "all" in policy else versions[-1:])
    if v not in served:
        warnings.append(f"warning: config.pbtxt serves version(s) {served}, not the plan's v{v}; promote v{v} "
                        f"or plan on the served version")
    want = plan.chosen["config"]
    got = {
        "instance_count": sum(int(g.get("count", 1)) for g in cfg.get("instance_group", [])) or 1,
        "intra_op_thread_count": int(((cfg.get("parameters") or {}).get("intra_op_thread_count") or {})
                                     .get("string_value") or 0) or None,
        "dynamic_batching": "dynamic_batching" in cfg,
        "max_batch_size": int(cfg.get("max_batch_size") or 0),
    }
    if got["dynamic_batching"] and want.get("max_queue_delay_microseconds") is not None:
        got["max_queue_delay_microseconds"] = int(cfg["dynamic_batching"].get("max_queue_delay_microseconds") or 0)
    mbs = int(plan.chosen["max_batch_size"])
    planned = {**{k: want.get(k) for k in got}, "max_batch_size": mbs,
               "dynamic_batching": bool(want.get("dynamic_batching")) and mbs > 1}  # Triton batches only then
    diff = [f"{k} {'unset' if got[k] is None else got[k]} (plan {planned[k]})" for k in got if planned.get(k) is not None and got[k] != planned[k]]
    if diff:
        warnings.append(f"warning: {plan.model}/config.pbtxt differs from the plan: {', '.join(diff)}; the plan's "
                        f"replica count and p99 hold for the plan's configuration: apply it before deploying")
    return warnings


def _config(repo, name: str) -> dict | None:
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2  # noqa: F401  (without it, no config check)
    except ImportError:
        return None
    from retool.publish.config import config_json

    text = repo.config_text(name)
    if text is None:
        return None
    try:
        return config_json(text)
    except text_format.ParseError as exc:
        raise UsageError(f"{repo.url}: {name}/config.pbtxt does not parse ({exc}); run retool repo verify") from None
