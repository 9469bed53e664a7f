"""``retool deploy model-analyzer``: a Triton Model Analyzer config.yaml around the plan's chosen point,
for users who move to a GPU fleet (or want Model Analyzer's own search).

A manual search (run_config_search_disable) over instance counts, max_batch_size and the dynamic
batching delay around the chosen configuration, at request rates around the per-replica target,
with perf_analyzer fed the published version's held-out samples (samples.npz) as --input-data.

triton-model-analyzer 1.58 pins tritonclient 2.41 (retool needs 2.51's perf_analyzer), so it is not
a retool dependency. When it is importable its YAML key check runs; always, the keys are checked
against the lists below, taken from model_analyzer/config/input/config_command_profile.py (1.58).
"""
from __future__ import annotations

from pathlib import Path

from retool.errors import UsageError, ValidationFailed
from retool.procs import temp_dir

#: top-level keys of `model-analyzer profile` (1.58)
TOP_KEYS = frozenset("""
always_report_gpu_metrics batch_sizes bls_composing_models checkpoint_directory client_max_retries client_protocol
collect_cpu_metrics concurrency concurrency_sweep_disable config_file constraints cpu_only_composing_models
dcgm_disable duration_seconds early_exit_enable ensemble_composing_models export_path filename_model_gpu
filename_model_inference filename_server_only genai_perf_flags gpu_output_fields gpus inference_output_fields
latency_budget max_percentage_of_search_space min_percentage_of_search_space min_throughput model_repository
model_type monitoring_interval num_configs_per_model num_top_model_configs objectives optuna_early_exit_threshold
optuna_max_trials optuna_min_trials output_model_repository_path override_output_model_repository
perf_analyzer_cpu_util perf_analyzer_flags perf_analyzer_max_auto_adjusts perf_analyzer_path perf_analyzer_timeout
perf_output perf_output_path plots profile_models reload_model_disable request_rate request_rate_search_enable
run_config_profile_models_concurrently_enable run_config_search_disable run_config_search_max_binary_search_steps
run_config_search_max_concurrency run_config_search_max_instance_count run_config_search_max_model_batch_size
run_config_search_max_request_rate run_config_search_min_concurrency run_config_search_min_instance_count
run_config_search_min_model_batch_size run_config_search_min_request_rate run_config_search_mode
server_output_fields skip_detailed_reports skip_summary_reports triton_docker_args triton_docker_image
triton_docker_labels triton_docker_mounts triton_docker_shm_size triton_grpc_endpoint triton_http_endpoint
triton_install_path triton_launch_mode triton_metrics_url triton_output_path triton_server_environment
triton_server_flags triton_server_path use_concurrency_formula weighting""".split())
#: keys of one entry of profile_models
MODEL_KEYS = frozenset({"cpu_only", "parameters", "objectives", "constraints", "weighting", "model_config_parameters",
                        "perf_analyzer_flags", "genai_perf_flags", "triton_server_flags",
                        "triton_server_environment", "triton_docker_args"})
PARAMETER_KEYS = frozenset({"batch_sizes", "concurrency", "request_rate"})
LAUNCH_MODES = frozenset({"local", "docker", "remote", "c_api"})
INPUT_DATA = "input-data.json"


def _around(v: int, lo: int = 1) -> list[int]:
    return sorted({max(lo, v // 2), max(lo, v), max(lo, v * 2)})


def search_space(plan, gpu: bool = False) -> dict:
    """model_config_parameters: the chosen point and its neighbours (halve, double; instances +-1)."""
    cfg = plan.chosen["config"]
    n = int(cfg["instance_count"])
    space: dict = {"instance_group": [{"kind": "KIND_GPU" if gpu else "KIND_CPU",
                                       "count": sorted({max(1, n - 1), n, n + 1})}]}
    mbs = int(plan.chosen["max_batch_size"])
    if mbs > 0:
        space["max_batch_size"] = _around(mbs)
        if cfg.get("dynamic_batching"):
            delay = int(cfg.get("max_queue_delay_microseconds") or 0)
            space["dynamic_batching"] = {"max_queue_delay_microseconds": _around(delay, 0) if delay else [0, 100, 500]}
    return space


def config(plan, model_repository: str, input_data: str, gpu: bool = False) -> dict:
    target = plan.target_rps
    model = {
        "cpu_only": not gpu,
        "model_config_parameters": search_space(plan, gpu),
        "parameters": {"request_rate": _around(target)},
        "perf_analyzer_flags": {"input-data": input_data},
        "constraints": {"perf_latency_p99": {"max": float(plan.doc["inputs"]["budget_p99_ms"])}},
        "objectives": ({"perf_throughput": 10} if plan.get("inputs.profile") == "throughput"
                       else {"perf_latency_p99": 10}),
    }
    return {
        "model_repository": model_repository,
        "triton_launch_mode": "local",
        "run_config_search_disable": True,
        "client_protocol": "grpc",
        "collect_cpu_metrics": True,
        "override_output_model_repository": True,
        "profile_models": {plan.model: model},
    }


def _model_config_fields() -> frozenset | None:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return None
    return frozenset(f.name for f in model_config_pb2.ModelConfig.DESCRIPTOR.fields)


def check(doc: dict, where: str) -> None:
    """Model Analyzer's own key check when it is installed; the documented lists always."""
    def bad(msg):
        return ValidationFailed(f"{where}: {msg} (a retool bug: nothing was written)")

    unknown = sorted(set(doc) - TOP_KEYS)
    if unknown:
        raise bad(f"unknown Model Analyzer key {unknown[0]!r}")
    if doc.get("triton_launch_mode") not in LAUNCH_MODES:
        raise bad(f"triton_launch_mode {doc.get('triton_launch_mode')!r} not one of {sorted(LAUNCH_MODES)}")
    models = doc.get("profile_models")
    if not isinstance(models, dict) or not models:
        raise bad("profile_models must name at least one model")
    fields = _model_config_fields()
    for name, m in models.items():
        extra = sorted(set(m) - MODEL_KEYS) or sorted(set(m.get("parameters", {})) - PARAMETER_KEYS)
        if extra:
            raise bad(f"profile_models.{name}: unknown key {extra[0]!r}")
        if fields is not None and set(m.get("model_config_parameters", {})) - fields:
            raise bad(f"profile_models.{name}.model_config_parameters: "
                      f"{sorted(set(m['model_config_parameters']) - fields)[0]!r} is not a ModelConfig field")
        data = (m.get("perf_analyzer_flags") or {}).get("input-data")
        if data is not None and not Path(data).is_absolute():  # perf_analyzer runs from Model Analyzer's cwd
            raise bad(f"perf_analyzer_flags.input-data {data}: not an absolute path")
    try:
        from model_analyzer.config.input.yaml_config_validator import YamlConfigValidator
    except ImportError:
        return
    try:
        YamlConfigValidator.validate(doc)
    except Exception as exc:  # TritonModelAnalyzerException
        raise bad(f"Model Analyzer refused it: {exc}") from None


def build(plan, repo_url: str, out: Path, *, local_repository: str | None = None, gpu: bool = False) -> dict:
    """file name -> content (config.yaml text, input-data.json bytes) for the folder ``out``."""
    import yaml

    from retool.deploy.common import is_remote
    from retool.publish import open_repo
    from retool.serve import loadtest as lt
    from retool.serve import samples as smp

    if local_repository:
        ma_repo = str(Path(local_repository).expanduser().resolve())
    elif is_remote(repo_url):
        raise UsageError(f"{repo_url}: Model Analyzer needs a local copy of the repository (it writes model "
                         f"variants beside it); download it (e.g. `aws s3 sync {repo_url} ./triton`) and pass "
                         f"--local-repository ./triton")
    else:
        ma_repo = str(Path(repo_url).expanduser().resolve())
    if not (Path(ma_repo) / plan.model).is_dir():
        raise UsageError(f"{ma_repo}: no model folder {plan.model!r} (the plan's chosen model); publish it there "
                         f"or pass the repository the plan was made on")
    repo = open_repo(repo_url)
    v = int(plan.chosen["version"])
    if v not in repo.versions(plan.model):
        raise UsageError(f"{repo_url}: {plan.model} has no version {v} (the plan's); plan again on this repository")
    entry = repo.manifest(plan.model, v).get("samples") or {}
    if not entry.get("file") or entry.get("kind") == "generation":
        raise UsageError(f"{repo_url}: {plan.model} v{v} has no samples.npz for perf_analyzer's input data "
                         f"({entry.get('error') or 'published before retool stored samples'}); republish it")
    data = smp.load(repo.storage.read_bytes(f"{plan.model}/{v}/{entry['file']}"))
    with temp_dir("ma") as tmp:
        input_bytes = lt.input_data_file(data["in"], Path(tmp), batched=bool(entry.get("batched"))).read_bytes()
    input_path = str(Path(out).expanduser().resolve() / INPUT_DATA)
    doc = config(plan, ma_repo, input_path, gpu)
    return {"config.yaml": yaml.safe_dump(doc, sort_keys=False), INPUT_DATA: input_bytes, "_doc": doc}
