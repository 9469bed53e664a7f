"""``retool deploy kserve --raw``: Deployment + Service + HorizontalPodAutoscaler running tritonserver,
for clusters without KServe.

An s3:// (gs://, as://) repository is read by Triton itself (credentials from a Secret named by
--s3-secret, as AWS_* variables). A local repository is served from a PersistentVolumeClaim
mounted at /models, which the user fills with the repository folder (docs/deploy.md).

The HPA's first metric is the per-replica request rate the plan sustains x headroom, a Pods metric
that a metrics adapter must publish from Triton's nv_inference_request_success counter; the second,
CPU utilisation at the same headroom, works on any cluster with metrics-server.
"""
from __future__ import annotations

from retool.deploy import common
from retool.deploy.kserve import labels, triton_args
from retool.errors import UsageError

RPS_METRIC = "triton_inference_requests_per_second"
MOUNT = "/models"
#: repository URLs tritonserver reads itself
TRITON_SCHEMES = ("s3://", "gs://", "as://")
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def model_repository(repo: str, storage: str | None) -> str | None:
    """What --model-repository is: the remote URL, or None for the volume."""
    if storage:
        if not str(storage).startswith(TRITON_SCHEMES):
            raise UsageError(f"--storage-uri {storage}: tritonserver reads only {', '.join(TRITON_SCHEMES)} "
                             f"repositories itself; give one of those, or leave it out to serve from a volume")
        return storage.rstrip("/")
    if not common.is_remote(repo):
        return None
    if not str(repo).startswith(TRITON_SCHEMES):
        raise UsageError(f"{repo}: tritonserver reads only {', '.join(TRITON_SCHEMES)} repositories itself; "
                         f"copy it to one (or to a volume: a local REPO with --pvc)")
    return str(repo).rstrip("/")


def deployment(plan, name: str, repo: str, *, storage: str | None = None, image: str = common.TRITON_IMAGE,
               pvc: str | None = None, s3_secret: str | None = None, namespace: str | None = None) -> dict:
    url = model_repository(repo, storage)
    sel = {"app.kubernetes.io/name": name}
    container = {
        "name": "tritonserver", "image": image, "command": ["tritonserver"],
        "args": [f"--model-repository={url or MOUNT}", *triton_args(plan),
                 *(f"--{k}-port={v}" for k, v in PORTS.items())],
        "ports": [{"name": k, "containerPort": v, "protocol": "TCP"} for k, v in PORTS.items()],
        "resources": common.resources(plan),
        "readinessProbe": {"httpGet": {"path": f"/v2/models/{plan.model}/ready", "port": "http"},
                           "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 10},
        "startupProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 5,
                         "failureThreshold": 60},
    }
    pod: dict = {"containers": [container]}
    if url is None:
        container["volumeMounts"] = [{"name": "model-repository", "mountPath": MOUNT, "readOnly": True}]
        pod["volumes"] = [{"name": "model-repository",
                           "persistentVolumeClaim": {"claimName": pvc or f"{name}-models", "readOnly": True}}]
    if s3_secret:
        container["envFrom"] = [{"secretRef": {"name": s3_secret}}]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(plan, name, namespace),
        "spec": {"replicas": plan.replicas, "selector": {"matchLabels": sel},
                 "template": {"metadata": {"labels": {**sel, **labels(plan)},
                                           "annotations": {"prometheus.io/scrape": "true",
                                                           "prometheus.io/port": str(PORTS["metrics"])}},
                              "spec": pod}},
    }


def _meta(plan, name, namespace) -> dict:
    m = {"name": name, "labels": {"app.kubernetes.io/name": name, **labels(plan)}}
    if namespace:
        m["namespace"] = namespace
    return m


def service(plan, name: str, namespace: str | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(plan, name, namespace),
            "spec": {"selector": {"app.kubernetes.io/name": name},
                     "ports": [{"name": k, "port": v, "targetPort": k, "protocol": "TCP"} for k, v in PORTS.items()]}}


def hpa(plan, name: str, namespace: str | None = None, max_replicas: int | None = None) -> dict:
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(plan, name, namespace),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": plan.replicas,
            "maxReplicas": common.max_replicas(plan.replicas, max_replicas),
            "metrics": [
                {"type": "Pods", "pods": {"metric": {"name": RPS_METRIC},
                                          "target": {"type": "AverageValue", "averageValue": str(plan.target_rps)}}},
                {"type": "Resource", "resource": {"name": "cpu", "target": {
                    "type": "Utilization", "averageUtilization": max(1, round(plan.headroom * 100))}}},
            ],
        },
    }


def manifests(plan, repo: str, name: str, *, storage: str | None = None, image: str | None = None,
              pvc: str | None = None, s3_secret: str | None = None, namespace: str | None = None,
              max_replicas: int | None = None) -> dict[str, dict]:
    return {
        "deployment.yaml": deployment(plan, name, repo, storage=storage, image=image or common.TRITON_IMAGE,
                                      pvc=pvc, s3_secret=s3_secret, namespace=namespace),
        "service.yaml": service(plan, name, namespace),
        "hpa.yaml": hpa(plan, name, namespace, max_replicas),
    }
