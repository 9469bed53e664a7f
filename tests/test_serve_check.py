"""retool repo check in a real Triton (the nvidia-pytriton binary): parity over HTTP and gRPC, and
Triton's own reason for each bad config. One server is shared by the module (start-up costs seconds)."""
from __future__ import annotations

import shutil

import numpy as np
import psutil
import pytest

from fixtures.onnx_tiny import linear
from fixtures.proc import run_retool
from retool.errors import ModelLoadError
from retool.publish import publish
from retool.serve.check import check
from retool.serve.server import TritonServer

BAD = {  # model -> (edit of config.pbtxt or the version folder, words Triton or the backend must say)
    "zero_dim": (lambda t: t.replace("dims: [ 4 ]", "dims: [ 0 ]"), "dimension must be integer >= 1"),
    "neg_dim": (lambda t: t.replace("dims: [ 4 ]", "dims: [ -3 ]"), "dimension must be integer >= 1"),
    "wrong_name": (lambda t: t.replace('name: "x"', 'name: "pixels"'),
                   "unexpected inference input 'pixels', allowed inputs are: x"),
    "wrong_dtype": (lambda t: t.replace("TYPE_FP32", "TYPE_INT64", 1),
                    "unexpected datatype TYPE_INT64 for inference input 'x', expecting TYPE_FP32"),
    "wrong_dims": (lambda t: t.replace("dims: [ 4 ]", "dims: [ 5 ]"), "the model expects dims [-1,4]"),
    "gpu": (lambda t: t.replace("KIND_AUTO", "KIND_GPU"), "KIND_GPU but no GPUs are available"),
    "no_file": (None, "unable to find"),
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-check")
    model = linear(root / "lin.onnx", seed=4)
    repo = root / "repo"
    publish(model, repo, "good", max_batch_size=4, max_regression="off")
    for name, (edit, _) in BAD.items():
        shutil.copytree(repo / "good", repo / name)
        cfg = repo / name / "config.pbtxt"
        cfg.write_text(cfg.read_text().replace('name: "good"', f'name: "{name}"'))
        if edit:
            cfg.write_text(edit(cfg.read_text()))
        else:
            (repo / name / "1" / "model.onnx").unlink()
    return repo


@pytest.fixture(scope="module")
def server(repo):
    with TritonServer(repo) as srv:
        yield srv


def test_published_model_loads_and_answers_like_the_samples_over_http_and_grpc(repo, server):
    rep = check(str(repo), "good", url=server.http_url, grpc_url=server.grpc_url)
    (m,) = rep["models"]
    assert m["passed"] and m["ready"] and m["version"] == 1
    assert {"name": "good", "version": "1", "state": "READY"} in m["index"]
    assert m["config"]["max_batch_size"] == 4 and m["config"]["backend"] == "onnxruntime"
    assert sorted((p["protocol"], p["batch"]) for p in m["parity"]) == [("grpc", 1), ("grpc", 4), ("http", 1),
                                                                       ("http", 4)]
    assert all(p["passed"] and p["max_abs"] < 1e-5 for p in m["parity"])


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_is_refused_with_tritons_reason(repo, server, name):
    with pytest.raises(ModelLoadError) as ei:
        check(str(repo), name, url=server.http_url, grpc_url=server.grpc_url)
    assert ei.value.exit_code == 7
    msg = str(ei.value)
    assert BAD[name][1] in msg and "\n" not in msg and " At: " not in msg, msg


def test_changed_answers_fail_parity_with_exit_6(repo, server, tmp_path):
    from retool.errors import ValidationFailed
    from retool.publish import open_repo

    r = open_repo(repo)
    # the published samples say other outputs than the model gives: parity must fail
    sp = repo / "good" / "1" / "samples.npz"
    saved = sp.read_bytes()
    try:
        with np.load(sp) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["out/y"] = arrays["out/y"] + 0.5
        np.savez(sp, **arrays)
        with pytest.raises(ValidationFailed) as ei:
            check(str(repo), "good", url=server.http_url, grpc_url=server.grpc_url)
        assert ei.value.exit_code == 6 and "differ from the published samples" in str(ei.value)
    finally:
        sp.write_bytes(saved)
    assert r.verify("good")[0] == []


@pytest.mark.slow
def test_cli_check_reads_the_reason_only_triton_s_log_has_and_leaves_no_server(repo, tmp_path):
    bad = tmp_path / "repo"
    shutil.copytree(repo / "good", bad / "neg")
    cfg = bad / "neg" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "good"', 'name: "neg"').replace("max_batch_size: 4",
                                                                                  "max_batch_size: -3"))
    r = run_retool("repo", "check", bad, "neg")
    assert r.returncode == 7, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'max_batch_size' must be non-negative" in lines[0], r.stderr
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(bad) in " ".join(p.info["cmdline"] or ())]

    ok = run_retool("repo", "check", repo, "good")
    assert ok.returncode == 0, ok.stderr
    assert "http@1 http@4 grpc@1 grpc@4 PASS" in ok.stdout


def _stub_threads(server) -> int:
    # the newest stub runs the model instance (python backend starts a model stub before it)
    stubs = [c for c in psutil.Process(server.pid).children(recursive=True) if "stub" in c.name()]
    return max(stubs, key=lambda c: c.create_time()).num_threads()


def test_backend_joins_queued_requests_into_one_run_and_honours_ort_threads(repo, server):
    import concurrent.futures as cf

    from retool.serve.client import Control, infer
    from retool.serve.session import Session
    from retool.serve.tune import override
    from retool.serve.profile import ServingConfig
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    sess = Session(Control(server.http_url), server.http_url, server.grpc_url, server, repo)
    base = json_format.MessageToDict(text_format.Parse((repo / "good" / "config.pbtxt").read_text(),
                                                       model_config_pb2.ModelConfig()), preserving_proto_field_name=True)
    # a long queue delay and preferred batch 4: four concurrent requests must become one execution
    sess.load("good", override(base, ServingConfig(1, 1, True, 2_000_000, (4,)), 4))
    one_thread = _stub_threads(server)
    x = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    with cf.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: infer("grpc", server.grpc_url, "good", {"x": x[i:i + 1]}, ["y"])["y"], range(4)))
    import time

    for _ in range(50):  # Triton counts a request once its response is released: just after the client has it
        stats = sess.control.stats("good")["model_stats"][0]
        if stats["inference_count"] == 4:
            break
        time.sleep(0.1)
    assert stats["inference_count"] == 4 and stats["execution_count"] == 1
    import onnxruntime as ort

    want = ort.InferenceSession(str(repo / "good" / "1" / "model.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.concatenate(outs), want, rtol=1e-5, atol=1e-6)  # each answer went to its request
    sess.load("good", override(base, ServingConfig(1, 4, False), 4))
    assert _stub_threads(server) - one_thread == 3  # ORT's intra-op pool: threads - 1 workers


def test_checking_every_model_reports_each_and_exits_7_for_the_refused(repo, server):
    with pytest.raises(ModelLoadError) as ei:
        check(str(repo), url=server.http_url, grpc_url=server.grpc_url)
    rep = ei.value.report
    by = {m["model"]: m for m in rep["models"]}
    assert set(by) == {"good", *BAD} and by["good"]["passed"]
    assert all(not by[n]["loaded"] and BAD[n][1] in by[n]["reason"] for n in BAD)
    assert f"and {len(BAD) - 1} more model(s) refused" in str(ei.value)


def test_cli_url_checks_against_an_existing_triton(repo, server):
    r = run_retool("repo", "check", repo, "good", "--url", server.http_url, "--grpc-url", server.grpc_url, "--json")
    assert r.returncode == 0, r.stderr
    import json

    rep = json.loads(r.stdout)
    assert rep["server"]["note"] == f"existing Triton at {server.http_url}" and rep["models"][0]["passed"]
    bad = run_retool("repo", "check", repo, "gpu", "--url", server.http_url, "--grpc-url", server.grpc_url)
    assert bad.returncode == 7 and "KIND_GPU but no GPUs are available" in bad.stderr
