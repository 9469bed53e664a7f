"""A decoder's stored fp32 reference survives a change of folder; ``min_cosine=none`` disables the cosine gate
(issue 23). A random-weight Llama is enough: nothing here judges the int4 model's accuracy."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytestmark = [pytest.mark.torch, pytest.mark.slow]


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    """(folder it was made in, fp32 ONNX, int4 ONNX, the optimize report), all made with relative paths."""
    import os

    from fixtures import hf_models
    from retool.converter.core import convert
    from retool.optimizers.core import optimize

    work = tmp_path_factory.mktemp("work")
    folder = hf_models.random_decoder(work / "lm", "llama")
    old = os.getcwd()
    os.chdir(work)
    try:
        convert(str(folder), "fp32.onnx")
        _, report = optimize("fp32.onnx", "int4.onnx", target="cpu-int4", measure=False,
                             tolerance={"min_cosine": None, "min_top1": 0.0})
    finally:
        os.chdir(old)
    return work, work / "fp32.onnx", work / "int4.onnx", report


def test_min_cosine_none_disables_the_cosine_gate(int4):
    *_, report = int4
    gate = report.data["generation"]["gate"]
    assert gate["min_cosine"] == -1.0 and gate["min_agreement"] == 0.0  # not the target's 0.98 and 31/32
    assert report.data["tolerance"]["min_cosine"] is None
    assert report.passed


def test_stored_reference_is_absolute_and_publish_finds_it_from_elsewhere(int4, tmp_path, monkeypatch):
    from retool.publish import open_repo, publish

    from retool.onnx_info import sidecar_report_path

    work, fp32, path, _ = int4
    label = json.loads(sidecar_report_path(path).read_text())["data"]["reference"]["label"]
    assert label == str(fp32.resolve())
    monkeypatch.chdir(tmp_path)  # publish from another folder
    publish(path, tmp_path / "repo", "lm-int4", max_regression="off")
    gen = open_repo(tmp_path / "repo").manifest("lm-int4", 1)["samples"]["generation"]
    assert gen["reference"].startswith("fp32.onnx") and "reference_missing" not in gen


def test_missing_reference_warns(int4, tmp_path, capsys):
    import shutil

    from retool.publish import open_repo, publish

    work, fp32, path, _ = int4
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(str(fp32), moved / fp32.name)
    try:
        capsys.readouterr()
        publish(path, tmp_path / "repo", "lm-int4", max_regression="off")
        err = capsys.readouterr().err
    finally:
        shutil.move(str(moved / fp32.name), fp32)
    assert "fp32 reference" in err and str(fp32.resolve()) in err and "missing" in err
    gen = open_repo(tmp_path / "repo").manifest("lm-int4", 1)["samples"]["generation"]
    assert gen["reference_missing"] == str(fp32.resolve()) and "reference" not in gen
