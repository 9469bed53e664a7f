"""Core value types, errors and registry: the contracts every stage relies on."""
import dataclasses
import json

import pytest

from retool.errors import (ConversionError, MissingDependency, OptimizationError, PublishError, RetoolError,
                           TrustRequired, UsageError, ValidationFailed)
from retool.registry import Registry
from retool.types import CheckResult, ModelArtifact, ProvenanceStep, Report, TensorSpec


def test_tensor_spec_parse_symbolic_and_static_dims():
    s = TensorSpec.parse("x:float32:batch,3,224,224")
    assert s == TensorSpec("x", "float32", ("batch", 3, 224, 224))
    assert s.has_dynamic_batch and s.is_dynamic
    assert s.concrete(batch=5) == (5, 3, 224, 224)
    assert TensorSpec.parse("ids:int64:?,seq").shape == (None, "seq")
    assert TensorSpec.parse("t:fp16:1x3").shape == (1, 3)
    assert TensorSpec.parse("t:fp16:1x3").dtype == "float16"


@pytest.mark.parametrize("bad", ["x:float32:batch,3,,2", "x:complex9:1", ":float32:1", "x:float32:1.5"])
def test_tensor_spec_parse_rejects_malformed(bad):
    with pytest.raises(ValueError):
        TensorSpec.parse(bad)


def test_artifact_is_frozen_and_derive_appends_provenance(tmp_path):
    step1 = ProvenanceStep("convert", "t", {"torch": "2"}, {"opset": 18}, "a" * 64, "b" * 64)
    art = ModelArtifact(tmp_path / "m.onnx", "onnx", (TensorSpec("x", "float32", ("batch", 3)),), (), 18,
                        provenance=(step1,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        art.opset = 19  # type: ignore[misc]
    step2 = ProvenanceStep("optimize", "ort", {}, {"target": "cpu"}, "b" * 64, "c" * 64)
    new = art.derive(tmp_path / "o.onnx", step2, target="cpu")
    assert [p.stage for p in new.provenance] == ["convert", "optimize"]
    assert art.provenance == (step1,) and new.target == "cpu" and art.target is None
    assert new.source_sha256 == "a" * 64
    assert ModelArtifact.from_dict(json.loads(json.dumps(new.to_dict()))) == new


def test_report_json_round_trip_has_version_and_verdict():
    import numpy as np

    checks = (CheckResult("parity:y", True, np.float32(1e-6), 1e-4, details={"cosine": np.float64(1.0)}),
              CheckResult("latency", False, 12.0, 10.0, "too slow", severity="info"))
    rep = Report("convert", None, checks, {"timings": {"x": np.float32(1.5)}})
    d = json.loads(rep.to_json())
    assert d["schema_version"] == "1.0" and d["passed"] is True  # info checks do not gate
    assert Report.from_dict(d).checks[0].details["cosine"] == 1.0
    failing = rep.with_checks([CheckResult("size", False, 5, 1)])
    assert not failing.passed and [c.name for c in failing.failed_checks] == ["size"]


def test_every_error_carries_a_distinct_exit_code():
    codes = {cls: cls("x").exit_code for cls in (UsageError, ConversionError, OptimizationError,
                                                 ValidationFailed, PublishError)}
    codes[MissingDependency] = MissingDependency("torch", "torch").exit_code
    assert codes == {UsageError: 2, MissingDependency: 3, ConversionError: 4, OptimizationError: 5,
                     ValidationFailed: 6, PublishError: 7}
    assert issubclass(TrustRequired, UsageError) and RetoolError("x").exit_code == 1
    assert "pip install -c constraints.txt '.[torch]'" in str(MissingDependency("torch", "torch"))


def test_registry_is_lazy_and_suggests_names():
    reg = Registry("target", {"cpu": "json:dumps", "cpu-int8": "no.such.module:x"})
    assert reg.get("cpu") is json.dumps
    with pytest.raises(UsageError, match="did you mean 'cpu-int8'"):
        reg.get("cpu-int9")
