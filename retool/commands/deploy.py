"""retool deploy: Kubernetes manifests (KServe or plain) and a Model Analyzer config from a serving plan."""
from __future__ import annotations

import json
from pathlib import Path

import click

from retool.publish.signing import require_signed, signed_by, trust_options

_COMMON = [
    click.argument("repo_url", metavar="REPO"),
    click.argument("name"),
    click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False),
                 help="Serving plan JSON written by `retool plan`."),
    click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
                 help="Folder to write (must be empty or absent unless --force)."),
    click.option("--force", is_flag=True, help="Replace the contents of a non-empty -o folder."),
    click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON."),
]


def _common(f):
    for opt in reversed(_COMMON):
        f = opt(f)
    return trust_options(f)


def _emit(summary: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for p in summary["files"]:
        click.echo(f"wrote {p}")
    for line in summary.get("notes", []):
        click.echo(line)


def _load(repo_url, name, plan_path, trust_key=None, require_signature=False):
    from retool.deploy import common
    from retool.deploy.plan import load_plan

    plan = load_plan(plan_path)
    common.check_name(name, plan)
    common.check_repository(repo_url, plan)
    require_signed(repo_url, [plan.model], trust_key, require_signature)
    return plan


@click.group("deploy")
def deploy_group():
    """Deploy a serving plan: KServe or plain Kubernetes manifests, or a Model Analyzer config."""


@deploy_group.command("kserve")
@_common
@click.option("--raw", is_flag=True, help="A plain Deployment + Service + HorizontalPodAutoscaler running "
                                          "tritonserver, for clusters without KServe.")
@click.option("--storage-uri", help="Where the cluster reads the repository (s3://...), required when REPO is "
                                    "a local folder (KServe; with --raw a local folder is served from a volume).")
@click.option("--name", "resource", help="Name of the Kubernetes objects (default: NAME, made a valid name).")
@click.option("--namespace", help="metadata.namespace of every object (default: none; kubectl's current one).")
@click.option("--runtime-image", help="KServe: write a ServingRuntime for this CPU Triton image and use it "
                                      "instead of the cluster's kserve-tritonserver.")
@click.option("--service-account", help="KServe: the ServiceAccount whose Secret holds the S3 credentials "
                                        "KServe's storage initializer uses.")
@click.option("--image", help="--raw: the tritonserver image (default: Triton 2.51, NGC 24.10).")
@click.option("--pvc", help="--raw with a local REPO: the PersistentVolumeClaim holding it (default NAME-models).")
@click.option("--s3-secret", help="--raw: a Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and "
                                  "AWS_DEFAULT_REGION) for an s3:// repository.")
@click.option("--max-replicas", type=click.IntRange(min=1), help="Upper replica bound (default: 2 x the plan's).")
@click.option("--kube-version", default="1.30", show_default=True,
              help="Kubernetes version whose schemas the manifests are validated against.")
def kserve_cmd(repo_url, name, plan_path, out_dir, force, as_json, raw, storage_uri, resource, namespace,
               runtime_image, service_account, image, pvc, s3_secret, max_replicas, kube_version, require_signature,
               trust_key):
    """Write an InferenceService (or, with --raw, plain manifests) serving the plan's choice to -o."""
    import yaml

    from retool.deploy import checks, common
    from retool.errors import UsageError

    common.check_out(Path(out_dir).expanduser(), force)
    plan = _load(repo_url, name, plan_path, trust_key, require_signature)
    kube_version = checks.kube_version(kube_version)
    obj = common.resource_name(resource or name, "--name" if resource else "NAME")
    if raw:
        from retool.deploy import raw as mod

        if runtime_image or service_account:
            raise UsageError("--runtime-image and --service-account are for KServe; with --raw give the Triton "
                             "image with --image and S3 credentials with --s3-secret")
        docs = mod.manifests(plan, repo_url, obj, storage=storage_uri, image=image, pvc=pvc, s3_secret=s3_secret,
                             namespace=namespace, max_replicas=max_replicas)
    else:
        from retool.deploy import kserve as mod

        if image or pvc or s3_secret:
            raise UsageError("--image, --pvc and --s3-secret are for --raw; KServe reads storageUri with its own "
                             "storage initializer (credentials: --service-account, see docs/deploy.md)")
        docs = mod.manifests(plan, repo_url, obj, storage=storage_uri, namespace=namespace,
                             runtime_image=runtime_image, max_replicas=max_replicas, service_account=service_account,
                             signed_by=signed_by(repo_url, plan.model, plan.chosen["version"], trust_key))
    warnings = common.published_check(repo_url, plan)
    for doc in docs.values():  # refuse to write anything that does not validate
        checks.check(doc, kube_version)
    files = {fn: yaml.safe_dump(doc, sort_keys=False) for fn, doc in docs.items()}
    written = common.write_folder(Path(out_dir), files, force)
    for w in warnings:
        click.echo(w, err=True)
    summary = {
        "files": [str(p) for p in written], "model": plan.model, "version": plan.chosen["version"],
        "replicas": {"min": plan.replicas, "max": common.max_replicas(plan.replicas, max_replicas)},
        "autoscaling": {"metric": "rps", "target_per_replica": plan.target_rps,
                        "rule": f"floor(sustainable {plan.sustainable_rate:g}/s x headroom {plan.headroom:g})"},
        "resources": common.resources(plan)["requests"],
        "validated": {"kubernetes": kube_version, "kserve": not raw},
        "infer": f"/v2/models/{plan.model}/infer",
        "warnings": warnings,
        "notes": [f"apply: kubectl apply -f {out_dir}  (then see docs/deploy.md for the checks)"],
    }
    _emit(summary, as_json)


@deploy_group.command("model-analyzer")
@_common
@click.option("--local-repository", type=click.Path(file_okay=False),
              help="A local copy of a remote REPO for Model Analyzer (it writes model variants beside it).")
@click.option("--gpu", is_flag=True, help="Search GPU instances (KIND_GPU) instead of the plan's CPU ones.")
def model_analyzer_cmd(repo_url, name, plan_path, out_dir, force, as_json, local_repository, gpu, require_signature,
                       trust_key):
    """Write a Model Analyzer config.yaml searching around the plan's choice, with input data from samples.npz."""
    from retool.deploy import common
    from retool.deploy import model_analyzer as ma

    out = Path(out_dir).expanduser()
    common.check_out(out, force)
    plan = _load(repo_url, name, plan_path, trust_key, require_signature)
    files = ma.build(plan, repo_url, out, local_repository=local_repository, gpu=gpu)
    doc = files.pop("_doc")
    ma.check(doc, str(out / "config.yaml"))
    written = common.write_folder(out, files, force)
    _emit({"files": [str(p) for p in written], "model": plan.model, "version": plan.chosen["version"],
           "notes": [f"run: model-analyzer profile -f {out / 'config.yaml'}"]}, as_json)
