"""The pipeline's publish step: a target whose model file is byte-identical to one another target of the
same model published in this run (cpu-auto choosing cpu) is not published a second time (issue 20 item 2)."""
from __future__ import annotations

import shutil

from fixtures.onnx_tiny import linear
from retool.fsutil import sha256_file
from retool.pipeline.config import ModelConfig, TargetConfig
from retool.pipeline.runner import _Scheduler
from retool.publish import open_repo


def _scheduler(base):
    s = _Scheduler.__new__(_Scheduler)  # only what the publish step reads
    s.base, s.converts, s.by_bytes = str(base), {}, {}
    return s


def test_a_second_target_with_the_same_bytes_points_at_the_first(tmp_path):
    repo = tmp_path / "repo"
    (tmp_path / "cpu").mkdir()
    cpu = linear(tmp_path / "cpu" / "model.onnx")
    (tmp_path / "auto").mkdir()
    auto = tmp_path / "auto" / "model.onnx"
    shutil.copyfile(cpu, auto)  # cpu-auto kept the cpu candidate: the same bytes
    (tmp_path / "int8").mkdir()
    other = linear(tmp_path / "int8" / "model.onnx", seed=4)
    m = ModelConfig("lin", "lin.onnx", targets=(TargetConfig("cpu"), TargetConfig("cpu-auto"),
                                               TargetConfig("cpu-int8")), repository=str(repo))
    sched = _scheduler(tmp_path)

    def stages(path):
        return {"validate": {"passed": True}, "optimize": {"path": str(path), "sha256": sha256_file(path)}}

    first = sched._publish(m, m.targets[0], stages(cpu))
    assert first["status"] == "ok" and first["name"] == "lin-cpu" and first["version"] == 1
    second = sched._publish(m, m.targets[1], stages(auto))
    assert second["status"] == "same" and second["name"] == "lin-cpu" and second["version"] == 1
    assert second["same_as"] == "cpu" and "not published twice" in second["message"]
    third = sched._publish(m, m.targets[2], stages(other))  # different bytes: published under its own name
    assert third["status"] == "ok" and third["name"] == "lin-cpu-int8"
    r = open_repo(repo)
    assert sorted(r.models()) == ["lin-cpu", "lin-cpu-int8"]
    assert r.verify()[0] == []
    # a re-run: the first target is already published, the second still points at it
    sched = _scheduler(tmp_path)
    assert sched._publish(m, m.targets[0], stages(cpu))["note"] == "already published"
    assert sched._publish(m, m.targets[1], stages(auto))["status"] == "same"
    assert sorted(r.models()) == ["lin-cpu", "lin-cpu-int8"]
