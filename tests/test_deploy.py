"""retool deploy: KServe, raw Kubernetes and Model Analyzer files from a serving plan, validated offline
by the kserve SDK's typed models and kubernetes-validate, and read back against the plan's figures."""
import base64
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from retool.deploy import checks
from retool.deploy.common import parse_quantity
from retool.errors import ValidationFailed

ROOT = Path(__file__).resolve().parents[1]
S3 = "s3://models-prod/triton"


def example_plan(repository: str = S3, **chosen) -> dict:
    """A serving plan as `retool plan` writes it (contract version 1): examples/plan.example.json."""
    plan = json.loads((ROOT / "examples" / "plan.example.json").read_text())
    plan["repository"] = repository
    plan["chosen"].update(chosen)
    return plan


def write_plan(tmp_path, plan: dict, name="plan.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(plan))
    return p


def read_all(folder: Path) -> dict:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(folder.glob("*.yaml"))}


def test_the_example_plan_file_is_a_valid_plan():
    from retool.deploy.plan import load_plan

    plan = load_plan(ROOT / "examples" / "plan.example.json")
    assert plan.replicas == 4 and plan.target_rps == 126 and plan.memory_bytes == 512 << 20
    # replicas = ceil(rate / (sustainable x headroom)), as retool plan computes them
    assert plan.replicas == math.ceil(plan.doc["inputs"]["rate"] / (plan.sustainable_rate * plan.headroom))


def test_kserve_inference_service_validates_and_carries_the_plans_figures(tmp_path, cli):
    plan = example_plan()
    r = cli("deploy", "kserve", S3, "cnn", "--plan", write_plan(tmp_path, plan), "-o", tmp_path / "k8s")
    assert r.code == 0, r.err
    docs = read_all(tmp_path / "k8s")
    assert list(docs) == ["inferenceservice.yaml"]
    isvc = checks.check_kserve(docs["inferenceservice.yaml"])  # the SDK's typed model, built strictly
    assert type(isvc).__name__ == "V1beta1InferenceService" and isvc.metadata["name"] == "cnn"
    pred = isvc.spec.predictor
    c = plan["chosen"]
    assert pred.min_replicas == c["replicas"] == 4 and pred.max_replicas == 2 * c["replicas"]
    assert pred.scale_metric == "rps"
    assert pred.scale_target == math.floor(round(c["sustainable_rate"]["value"] * plan["inputs"]["headroom"], 6)) == 126
    m = pred.model
    assert m.model_format.name == "triton" and m.runtime == "kserve-tritonserver" and m.protocol_version == "v2"
    assert m.storage_uri == S3
    assert "--model-control-mode=explicit" in m.args and f"--load-model={c['model']}" in m.args
    for side in ("requests", "limits"):
        assert parse_quantity(m.resources[side]["cpu"]) == c["resources"]["cpu"]
        assert parse_quantity(m.resources[side]["memory"]) == c["resources"]["memory_bytes"]


def test_a_cpu_runtime_image_adds_a_validated_serving_runtime(tmp_path, cli):
    r = cli("deploy", "kserve", S3, "cnn-cpu-int8", "--plan", write_plan(tmp_path, example_plan()),
            "-o", tmp_path / "k8s", "--runtime-image", "registry.example/triton-cpu:24.10", "--namespace", "ml",
            "--name", "cnn-serving", "--service-account", "s3-reader")
    assert r.code == 0, r.err
    docs = read_all(tmp_path / "k8s")
    rt = checks.check_kserve(docs["servingruntime.yaml"])
    assert type(rt).__name__ == "V1alpha1ServingRuntime"
    assert rt.spec.supported_model_formats[0].name == "triton" and "v2" in rt.spec.protocol_versions
    assert rt.spec.containers[0]["image"] == "registry.example/triton-cpu:24.10"
    isvc = checks.check_kserve(docs["inferenceservice.yaml"])
    assert isvc.spec.predictor.model.runtime == rt.metadata["name"] == "cnn-serving-triton"
    assert isvc.metadata["namespace"] == rt.metadata["namespace"] == "ml"
    assert isvc.spec.predictor.service_account_name == "s3-reader"


def test_raw_manifests_pass_kubernetes_validate_and_carry_the_plans_figures(tmp_path, cli):
    import kubernetes_validate

    plan = example_plan(replicas=3, sustainable_rate={"value": 55.5, "interval": [50.0, 60.0]})
    r = cli("deploy", "kserve", S3, "cnn", "--raw", "--plan", write_plan(tmp_path, plan), "-o", tmp_path / "k8s",
            "--s3-secret", "aws-creds", "--max-replicas", "10", "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["replicas"] == {"min": 3, "max": 10} and summary["autoscaling"]["target_per_replica"] == 38
    docs = read_all(tmp_path / "k8s")
    assert sorted(docs) == ["deployment.yaml", "hpa.yaml", "service.yaml"]
    for doc in docs.values():
        kubernetes_validate.validate(doc, checks.KUBE_VERSION, strict=True)
    dep, hpa = docs["deployment.yaml"], docs["hpa.yaml"]
    assert dep["spec"]["replicas"] == 3
    ctr = dep["spec"]["template"]["spec"]["containers"][0]
    assert f"--model-repository={S3}" in ctr["args"] and "--load-model=cnn-cpu-int8" in ctr["args"]
    assert ctr["envFrom"] == [{"secretRef": {"name": "aws-creds"}}]
    assert parse_quantity(ctr["resources"]["limits"]["cpu"]) == 2
    assert parse_quantity(ctr["resources"]["requests"]["memory"]) == 536870912
    assert hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["maxReplicas"] == 10
    rps = next(m for m in hpa["spec"]["metrics"] if m["type"] == "Pods")["pods"]["target"]["averageValue"]
    assert int(rps) == math.floor(55.5 * 0.7) == 38
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"] == docs["service.yaml"]["metadata"]["name"]


def published_repo(tmp_path, **kw) -> Path:
    """A local repository holding the plan's model, cnn-cpu-int8 v1 (a tiny seeded linear model)."""
    from fixtures.onnx_tiny import linear
    from retool.publish import publish

    repo = tmp_path / "repo"
    publish(linear(tmp_path / "m.onnx"), repo, "cnn-cpu-int8", max_regression="off", **kw)
    (tmp_path / "m.onnx").unlink()
    return repo


def test_raw_with_a_local_repository_serves_it_from_a_volume(tmp_path, cli):
    repo = published_repo(tmp_path, max_batch_size=8)
    r = cli("deploy", "kserve", repo, "cnn", "--raw", "--plan", write_plan(tmp_path, example_plan(str(repo))),
            "-o", tmp_path / "k8s", "--pvc", "triton-models")
    assert r.code == 0, r.err
    pod = read_all(tmp_path / "k8s")["deployment.yaml"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "triton-models"
    assert "--model-repository=/models" in pod["containers"][0]["args"]


def test_a_local_repository_needs_storage_uri_for_kserve(tmp_path, cli):
    repo = published_repo(tmp_path, max_batch_size=8)
    plan = write_plan(tmp_path, example_plan(str(repo)))
    r = cli("deploy", "kserve", repo, "cnn", "--plan", plan, "-o", tmp_path / "k8s")
    assert r.code == 2 and "--storage-uri" in r.err and len(r.err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "repo"]  # nothing written, no temp left
    r = cli("deploy", "kserve", repo, "cnn", "--plan", plan, "-o", tmp_path / "k8s", "--storage-uri",
            "s3://bucket/copy/")
    assert r.code == 0, r.err
    isvc = checks.check_kserve(read_all(tmp_path / "k8s")["inferenceservice.yaml"])
    assert isvc.spec.predictor.model.storage_uri == "s3://bucket/copy"
    # published without the plan's configuration: deployed, and said so
    assert "differs from the plan" in r.err and "max_queue_delay_microseconds 100 (plan 500)" in r.err


def test_an_unset_thread_count_is_flagged_for_pods(tmp_path, cli):
    plan = example_plan(config={"instance_count": 1, "intra_op_thread_count": None, "dynamic_batching": False})
    r = cli("deploy", "kserve", S3, "cnn", "--plan", write_plan(tmp_path, plan), "-o", tmp_path / "k8s", "--json")
    assert r.code == 0, r.err
    assert "intra_op_thread_count" in r.err and any("set it to 2" in w for w in json.loads(r.out)["warnings"])


def test_a_local_repository_must_hold_the_plans_model_and_version(tmp_path, cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("deploy", "kserve", empty, "cnn", "--raw", "--plan", write_plan(tmp_path, example_plan(str(empty))),
            "-o", tmp_path / "k8s")
    assert r.code == 2 and "no model 'cnn-cpu-int8'" in r.err and not (tmp_path / "k8s").exists()
    repo = published_repo(tmp_path)
    r = cli("deploy", "kserve", repo, "cnn", "--raw", "--plan", write_plan(tmp_path, example_plan(str(repo), version=2)),
            "-o", tmp_path / "k8s")
    assert r.code == 2 and "no version 2" in r.err and not (tmp_path / "k8s").exists()


def _drop(doc, dotted):
    *head, last = dotted.split(".")
    for k in head:
        doc = doc[k]
    del doc[last]


@pytest.mark.parametrize("mutate,needle", [
    (lambda p: "{not json", "not JSON"),
    (lambda p: json.dumps({**p, "kind": "something-else"}), "not a serving plan"),
    (lambda p: json.dumps({**p, "version": 7}), "version 7"),
    (lambda p: (_drop(p, "chosen.replicas"), json.dumps(p))[1], "missing key 'chosen.replicas'"),
    (lambda p: (_drop(p, "inputs.headroom"), json.dumps(p))[1], "missing key 'inputs.headroom'"),
    (lambda p: json.dumps({**p, "chosen": {**p["chosen"], "replicas": 0}}), "'chosen.replicas' is 0"),
    (lambda p: json.dumps({**p, "chosen": {**p["chosen"], "sustainable_rate": {"value": "fast"}}}),
     "'chosen.sustainable_rate.value'"),
    (lambda p: json.dumps({**p, "met": False, "chosen": None, "closest": {"label": "1 inst x 1 thr",
                                                                         "over_budget_ms": 3.5}}),
     "met no budget"),
])
def test_a_bad_plan_exits_2_naming_file_and_key(tmp_path, cli, mutate, needle):
    bad = tmp_path / "plan.json"
    bad.write_text(mutate(example_plan()))
    r = cli("deploy", "kserve", S3, "cnn", "--plan", bad, "-o", tmp_path / "k8s")
    assert r.code == 2 and needle in r.err and str(bad) in r.err, r.err
    assert "Traceback" not in r.err and not (tmp_path / "k8s").exists()


def test_missing_plan_file_and_mismatched_name_or_repo_exit_2(tmp_path, cli):
    r = cli("deploy", "kserve", S3, "cnn", "--plan", tmp_path / "nope.json", "-o", tmp_path / "k8s")
    assert r.code == 2 and "plan file not found" in r.err
    plan = write_plan(tmp_path, example_plan())
    r = cli("deploy", "kserve", S3, "bert", "--plan", plan, "-o", tmp_path / "k8s")
    assert r.code == 2 and "not 'bert'" in r.err
    r = cli("deploy", "kserve", "s3://other/triton", "cnn", "--plan", plan, "-o", tmp_path / "k8s")
    assert r.code == 2 and "not s3://other/triton" in r.err
    assert not (tmp_path / "k8s").exists()


def test_an_unknown_kubernetes_version_exits_2(tmp_path, cli):
    r = cli("deploy", "kserve", S3, "cnn", "--plan", write_plan(tmp_path, example_plan()), "-o", tmp_path / "k8s",
            "--kube-version", "9.99")
    assert r.code == 2 and "--kube-version" in r.err and not (tmp_path / "k8s").exists()


def test_a_non_empty_output_needs_force_and_is_then_replaced_whole(tmp_path, cli):
    out = tmp_path / "k8s"
    out.mkdir()
    (out / "old.yaml").write_text("kind: Old\n")
    plan = write_plan(tmp_path, example_plan())
    r = cli("deploy", "kserve", S3, "cnn", "--plan", plan, "-o", out)
    assert r.code == 2 and "--force" in r.err and [p.name for p in out.iterdir()] == ["old.yaml"]
    r = cli("deploy", "kserve", S3, "cnn", "--plan", plan, "-o", out, "--force")
    assert r.code == 0, r.err
    assert [p.name for p in out.iterdir()] == ["inferenceservice.yaml"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".retool-tmp-")]


def test_the_checks_refuse_what_the_schemas_refuse():
    from retool.deploy import kserve, raw
    from retool.deploy.plan import Plan

    plan = Plan(Path("plan.json"), example_plan())
    isvc = kserve.inference_service(plan, "cnn", S3)
    checks.check_kserve(isvc)
    typo = json.loads(json.dumps(isvc))
    typo["spec"]["predictor"]["minReplica"] = 2  # the SDK's own deserializer would drop it silently
    with pytest.raises(ValidationFailed, match="minReplica"):
        checks.check_kserve(typo)
    no_pred = {**isvc, "spec": {}}
    with pytest.raises(ValidationFailed, match="predictor"):  # the typed model's required field
        checks.check_kserve(no_pred)
    bad_res = json.loads(json.dumps(isvc))
    bad_res["spec"]["predictor"]["model"]["resources"]["limits"]["gpu"] = {"n": 1}
    with pytest.raises(ValidationFailed, match="resources"):  # embedded Kubernetes type, by its schema
        checks.check_kserve(bad_res)
    dep = raw.deployment(plan, "cnn", S3)
    checks.check_builtin(dep)
    dep["spec"]["replicas"] = "four"
    with pytest.raises(ValidationFailed, match="replicas"):
        checks.check_builtin(dep)


def test_model_analyzer_config_around_the_chosen_point_with_input_data_from_samples(tmp_path, cli):
    from retool.deploy import model_analyzer as ma
    from retool.publish import open_repo
    from retool.serve import samples

    repo = published_repo(tmp_path, max_batch_size=8)
    plan = example_plan(str(repo))
    r = cli("deploy", "model-analyzer", repo, "cnn", "--plan", write_plan(tmp_path, plan), "-o", tmp_path / "ma")
    assert r.code == 0, r.err
    cfg = yaml.safe_load((tmp_path / "ma" / "config.yaml").read_text())
    ma.check(cfg, "config.yaml")
    assert set(cfg) <= ma.TOP_KEYS and cfg["triton_launch_mode"] == "local"
    assert cfg["model_repository"] == str(repo.resolve()) and list(cfg["profile_models"]) == ["cnn-cpu-int8"]
    m = cfg["profile_models"]["cnn-cpu-int8"]
    space = m["model_config_parameters"]
    assert 1 in space["instance_group"][0]["count"] and space["instance_group"][0]["kind"] == "KIND_CPU"
    assert 8 in space["max_batch_size"] and 500 in space["dynamic_batching"]["max_queue_delay_microseconds"]
    assert 126 in m["parameters"]["request_rate"] and m["constraints"]["perf_latency_p99"]["max"] == 50.0
    data_file = Path(m["perf_analyzer_flags"]["input-data"])
    assert data_file == (tmp_path / "ma" / "input-data.json").resolve()
    rows = json.loads(data_file.read_text())["data"]
    want = samples.load(open_repo(repo).storage.read_bytes("cnn-cpu-int8/1/samples.npz"))["in"]["x"]
    got = np.stack([np.frombuffer(base64.b64decode(row["x"]["b64"]), np.float32) for row in rows])
    np.testing.assert_array_equal(got, want)


def test_model_analyzer_refuses_a_version_that_is_not_published(tmp_path, cli):
    repo = published_repo(tmp_path)
    r = cli("deploy", "model-analyzer", repo, "cnn", "--plan", write_plan(tmp_path, example_plan(str(repo), version=3)),
            "-o", tmp_path / "ma")
    assert r.code == 2 and "no version 3" in r.err and not (tmp_path / "ma").exists()


PROBE = """
import sys
sys.modules[{hide!r}] = None
from retool.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("hide,extra_hint", [("kubernetes_validate", None), ("kserve", "--no-deps kserve==0.21.0")])
def test_missing_checkers_exit_3_naming_the_extra(tmp_path, hide, extra_hint):
    plan = write_plan(tmp_path, example_plan())
    argv = ["deploy", "kserve", S3, "cnn", "--plan", str(plan), "-o", str(tmp_path / "k8s")]
    if hide == "kubernetes_validate":
        argv.append("--raw")
    proc = subprocess.run([sys.executable, "-c", PROBE.format(hide=hide, argv=argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "pip install -c constraints.txt '.[deploy]'" in proc.stderr and "Traceback" not in proc.stderr
    if extra_hint:
        assert extra_hint in proc.stderr
    assert not (tmp_path / "k8s").exists()


def test_model_analyzer_on_an_s3_repository_needs_a_local_copy(tmp_path, cli):
    from fixtures.onnx_tiny import linear
    from fixtures.s3 import moto_endpoint, new_bucket
    from retool.publish import publish

    with moto_endpoint() as endpoint:
        new_bucket(endpoint, "models")
        url = "s3://models/triton"
        publish(linear(tmp_path / "m.onnx"), url, "cnn-cpu-int8", max_batch_size=4, max_regression="off")
        plan = write_plan(tmp_path, example_plan(url, max_batch_size=4))
        r = cli("deploy", "model-analyzer", url, "cnn", "--plan", plan, "-o", tmp_path / "ma")
        assert r.code == 2 and "--local-repository" in r.err and not (tmp_path / "ma").exists()
        local = tmp_path / "copy"
        (local / "cnn-cpu-int8").mkdir(parents=True)  # what `aws s3 sync` would bring down
        r = cli("deploy", "model-analyzer", url, "cnn", "--plan", plan, "-o", tmp_path / "ma",
                "--local-repository", local, "--json")
        assert r.code == 0, r.err
        assert len(json.loads(r.out)["files"]) == 2
        cfg = yaml.safe_load((tmp_path / "ma" / "config.yaml").read_text())
        assert cfg["model_repository"] == str(local.resolve())
        rows = json.loads((tmp_path / "ma" / "input-data.json").read_text())["data"]
        assert len(rows) == 4 and rows[0]["x"]["shape"] == [4]  # the samples stored in S3, one row each
