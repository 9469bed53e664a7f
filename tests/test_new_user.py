"""What a new user meets first: install lines, small CLI wording, errors that keep their substance."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_install_line_points_at_the_unrelated_pypi_project():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            if "pip install" in line:
                assert not re.search(r"pip install[^`]*'retool\[", line) or "git+" in line, f"{doc.name}: {line}"
    readme = (ROOT / "README.md").read_text()
    assert "pip install -c constraints.txt '.[torch]'" in readme and "git+" in readme


# -- publish: a report about another file; an identical file -----------------------------------

def test_publish_refuses_a_report_about_another_file_unless_forced(tmp_path, cli):
    import json

    from fixtures.onnx_tiny import linear
    from retool.onnx_info import artifact_from_onnx
    from retool.types import CheckResult, Report

    a = linear(tmp_path / "a.onnx")
    b = linear(tmp_path / "b.onnx", seed=3)
    rep = tmp_path / "b.report.json"
    rep.write_text(Report("validate", artifact_from_onnx(b), (CheckResult("parity", True),), {}).to_json())
    repo = tmp_path / "repo"
    r = cli("publish", a, "--repo", repo, "--name", "m", "--report", rep)
    assert r.code == 7 and "about another file" in r.err and "--force" in r.err and "Traceback" not in r.err
    assert not (repo / "m" / "1").exists()
    r = cli("publish", a, "--repo", repo, "--name", "m", "--report", rep, "--force", "--json")
    assert r.code == 0, r.err
    m = json.loads((repo / "m" / "1" / "manifest.json").read_text())
    assert m["forced"] and any("another file" in x for x in m["forced_reasons"])


def test_republishing_an_identical_file_makes_no_new_version_unless_asked(tmp_path, cli):
    from fixtures.onnx_tiny import linear
    from retool.publish import open_repo, publish

    a = linear(tmp_path / "a.onnx")
    repo = tmp_path / "repo"
    assert publish(a, repo, "m").version == 1
    res = publish(a, repo, "m", alias="staging")
    assert res.unchanged and res.version == 1 and open_repo(repo).versions("m") == [1]
    assert open_repo(repo).aliases("m")["staging"]["version"] == 1
    r = cli("publish", a, "--repo", repo, "--name", "m")
    assert r.code == 0 and "identical to m version 1" in r.out and "--republish" in r.out
    r = cli("publish", a, "--repo", repo, "--name", "m", "--republish")
    assert r.code == 0 and open_repo(repo).versions("m") == [1, 2]


# -- errors keep their substance and their class ----------------------------------------------

def test_state_dict_that_does_not_fit_names_the_keys_and_is_a_usage_error(tmp_path, cli):
    torch = __import__("pytest").importorskip("torch")
    from fixtures import torch_models

    state = torch_models.transformer().state_dict()
    torch.save(state, tmp_path / "other.pt")
    r = cli("convert", "fixtures.torch_models:cnn", "--weights", tmp_path / "other.pt",
            "--input", "x:float32:batch,3,32,32", "-o", tmp_path / "m.onnx")
    assert r.code == 2, r.err
    line = r.err.strip().splitlines()[-1]
    assert "missing key(s):" in line and "unexpected key(s):" in line and "more" in line
    assert "Traceback" not in r.err and not (tmp_path / "m.onnx").exists()


def test_filesystem_errors_at_the_output_are_one_usage_line(tmp_path, cli):
    from fixtures.onnx_tiny import linear

    src = linear(tmp_path / "t.onnx")
    for out, words in ((Path("/proc/x.onnx"), "cannot write in /proc"),
                       (tmp_path / "newdir", "no file extension")):
        r = cli("convert", src, "-o", out)
        assert r.code == 2 and words in r.err and "Traceback" not in r.err, r.err
    assert not (tmp_path / "newdir").exists()
    r = cli("optimize", src, "--target", "cpu", "-o", "/proc/x.onnx")
    assert r.code == 2 and "cannot write in /proc" in r.err


def test_a_corrupt_onnx_file_given_to_convert_is_called_damaged(tmp_path, cli):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x07not onnx at all" * 10)
    r = cli("convert", bad, "-o", tmp_path / "o.onnx")
    assert r.code == 4 and "damaged" in r.err and "convert it first" not in r.err


def test_a_provider_this_onnxruntime_lacks_is_a_usage_error(tmp_path, cli):
    import onnxruntime as ort

    from fixtures.onnx_tiny import linear

    if "CUDAExecutionProvider" in ort.get_available_providers():
        __import__("pytest").skip("this onnxruntime has CUDA")
    r = cli("validate", linear(tmp_path / "t.onnx"), "--provider", "CUDAExecutionProvider")
    assert r.code == 2 and "CUDAExecutionProvider" in r.err and "not available" in r.err


def test_latency_of_a_gpu_target_measured_on_cpu_says_so(tmp_path, cli):
    import json

    from fixtures import onnx_speed
    from retool.optimizers.core import optimize

    fp32 = onnx_speed.identity(tmp_path / "fp32.onnx")
    art, _ = optimize(fp32, tmp_path / "trt.onnx", target="tensorrt-int8", measure=False)
    r = cli("validate", art.path, "--reference", fp32, "--latency", "--runs", "5", "--time-budget", "0.05",
            "--json")
    data = json.loads(r.out)["data"]
    assert "not on TensorRT" in data["latency"]["off_target"]
    assert not any(g["name"].startswith("not-slower") for g in data["gates"])  # CPU timings cannot judge it
    r = cli("validate", art.path, "--reference", fp32, "--latency", "--runs", "5", "--time-budget", "0.05")
    assert "latency p50 / p99 ms (on CPU, not the target's hardware)" in r.out
    r = cli("optimize", fp32, "--target", "gpu-fp16", "-o", tmp_path / "fp16.onnx", "--threads", "1")
    assert r.code == 0 and "measured on CPU, not on CUDA where gpu-fp16 runs" in r.out


# -- examples: templates say so; module references resolve from the pipeline file -------------

def test_example_templates_are_labelled_and_demo_is_not():
    d = ROOT / "examples" / "pipelines"
    for name in ("torch.yaml", "keras.yaml", "caffe.yaml"):
        assert (d / name).read_text().startswith("# TEMPLATE: not runnable as it is"), name
    assert "TEMPLATE" not in (d / "demo.yaml").read_text()


def test_module_and_file_references_resolve_relative_to_the_pipeline_file(tmp_path):
    from retool.pipeline.jobs import _resolve
    from retool.refs import package_root

    (tmp_path / "proj" / "mypkg").mkdir(parents=True)
    (tmp_path / "proj" / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "proj" / "pipelines" / "deep").mkdir(parents=True)
    (tmp_path / "proj" / "pipelines" / "deep" / "local.py").write_text("")
    base = tmp_path / "proj" / "pipelines" / "deep"
    assert package_root("mypkg.models:net", base) == (tmp_path / "proj").resolve()
    assert package_root("numpy:zeros", base) is None  # an installed package: nothing to add
    assert _resolve("local.py:net", base) == f"{base / 'local.py'}:net"


@__import__("pytest").mark.slow
def test_a_pipeline_run_from_another_folder_finds_its_models_package(tmp_path):
    import subprocess
    import sys

    proj = tmp_path / "proj"
    (proj / "mypkg").mkdir(parents=True)
    (proj / "mypkg" / "__init__.py").write_text("")
    (proj / "mypkg" / "nets.py").write_text(
        "import torch\n\ndef net():\n    torch.manual_seed(0)\n    m = torch.nn.Linear(4, 2).eval()\n"
        "    m.retool_inputs = ['x:float32:batch,4']\n    return m\n")
    (proj / "pipelines").mkdir()
    (proj / "pipelines" / "p.yaml").write_text(
        "version: 1\nmodels:\n  - name: lin\n    source: mypkg.nets:net\n    targets: [cpu]\n"
        "    validation: {latency: false}\n    publish: {when: never}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-m", "retool", "-q", "run", str(proj / "pipelines" / "p.yaml"),
                           "--out", str(tmp_path / "out")], cwd=elsewhere, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "out" / "lin" / "cpu" / "model.onnx").exists()


# -- small things ---------------------------------------------------------------------------------

def test_targets_spells_tensorrt_and_pads_no_line(cli):
    r = cli("targets")
    assert r.code == 0 and "TensorRT" in r.out and "Tensorrt" not in r.out
    assert not [ln for ln in r.out.splitlines() if ln != ln.rstrip()]


def test_a_python_file_as_source_suggests_file_colon_factory(tmp_path, cli):
    src = tmp_path / "mymodels.py"
    src.write_text("def build():\n    pass\n\nclass _Hidden:\n    pass\n")
    r = cli("convert", src, "-o", tmp_path / "m.onnx")
    assert r.code == 2 and f"{src}:build" in r.err
    src.write_text("x = 1\n")
    r = cli("convert", src, "-o", tmp_path / "m.onnx")
    assert r.code == 2 and f"{src}:factory" in r.err
