"""``retool deploy kserve``: an InferenceService (and optionally a ServingRuntime) from a serving plan.

KServe's ``kserve-tritonserver`` runtime mounts ``storageUri`` at /mnt/models and runs tritonserver
on it; requests go to /v2/models/<model directory>/infer. The predictor's ``args`` are appended to
the runtime's, and load only the plan's model (explicit model control), so a repository holding
several variants serves the chosen one.
"""
from __future__ import annotations

from retool.deploy import common
from retool.errors import UsageError

API = "serving.kserve.io/v1beta1"
RUNTIME = "kserve-tritonserver"
#: the arguments KServe's own kserve-tritonserver ClusterServingRuntime passes (ports it routes to)
RUNTIME_ARGS = ["tritonserver", "--model-store=/mnt/models", "--grpc-port=9000", "--http-port=8080",
                "--allow-grpc=true", "--allow-http=true"]
LABEL = "app.kubernetes.io/managed-by"


def triton_args(plan) -> list[str]:
    return ["--model-control-mode=explicit", f"--load-model={plan.model}"]


def storage_uri(repo: str, explicit: str | None) -> str:
    if explicit:
        if not common.is_remote(explicit):
            raise UsageError(f"--storage-uri {explicit}: not a URL the cluster can read; give s3://, gs://, "
                             f"pvc:// or https://")
        return explicit.rstrip("/")
    if common.is_remote(repo):
        return str(repo).rstrip("/")
    raise UsageError(f"{repo}: a local folder, which the cluster cannot read; copy it where the cluster can "
                     f"(e.g. `aws s3 sync {repo} s3://BUCKET/triton`) and pass --storage-uri s3://BUCKET/triton")


def labels(plan) -> dict:
    return {LABEL: "retool", "retool/model": common.resource_name(plan.model, "chosen.model"),
            "retool/version": str(plan.chosen["version"])}


def serving_runtime(name: str, image: str, namespace: str | None) -> dict:
    """A namespaced ServingRuntime for a CPU Triton image (e.g. one whose tritonserver has the ONNX
    Runtime backend but no CUDA), used instead of the cluster's kserve-tritonserver."""
    meta = {"name": name, "labels": {LABEL: "retool"}}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime", "metadata": meta,
        "spec": {
            "supportedModelFormats": [{"name": "triton", "version": "2", "autoSelect": True}],
            "protocolVersions": ["v2", "grpc-v2"],
            "containers": [{"name": "kserve-container", "image": image, "args": list(RUNTIME_ARGS),
                            "ports": [{"containerPort": 8080, "protocol": "TCP"}]}],
        },
    }


def inference_service(plan, name: str, uri: str, *, namespace: str | None = None, runtime: str = RUNTIME,
                      max_replicas: int | None = None, service_account: str | None = None,
                      signed_by: str | None = None) -> dict:
    meta = {"name": name, "labels": labels(plan),
            "annotations": {"retool/plan": plan.path.name, "retool/serves": f"{plan.model} v{plan.chosen['version']}",
                            "retool/infer-path": f"/v2/models/{plan.model}/infer"}}
    if signed_by:  # where a platform finds the signatures to check before loading (docs/publish.md)
        meta["annotations"].update({
            "retool/signature": f"{uri}/{plan.model}/{plan.chosen['version']}/model.sig",
            "retool/config-signature": f"{uri}/{plan.model}/config.sig", "retool/signed-by": f"sha256:{signed_by}"})
    if namespace:
        meta["namespace"] = namespace
    predictor = {"serviceAccountName": service_account} if service_account else {}
    return {
        "apiVersion": API, "kind": "InferenceService", "metadata": meta,
        "spec": {"predictor": {
            **predictor,
            "minReplicas": plan.replicas,
            "maxReplicas": common.max_replicas(plan.replicas, max_replicas),
            "scaleMetric": "rps",
            "scaleTarget": plan.target_rps,
            "model": {
                "modelFormat": {"name": "triton"},
                "runtime": runtime,
                "protocolVersion": "v2",
                "storageUri": uri,
                "args": triton_args(plan),
                "resources": common.resources(plan),
            },
        }},
    }


def manifests(plan, repo: str, name: str, *, storage: str | None = None, namespace: str | None = None,
              runtime_image: str | None = None, max_replicas: int | None = None,
              service_account: str | None = None, signed_by: str | None = None) -> dict[str, dict]:
    """file name -> manifest."""
    uri = storage_uri(repo, storage)
    out = {}
    runtime = RUNTIME
    if runtime_image:
        runtime = f"{name}-triton"
        out["servingruntime.yaml"] = serving_runtime(runtime, runtime_image, namespace)
    out["inferenceservice.yaml"] = inference_service(plan, name, uri, namespace=namespace, runtime=runtime,
                                                     max_replicas=max_replicas, service_account=service_account,
                                                     signed_by=signed_by)
    return out
