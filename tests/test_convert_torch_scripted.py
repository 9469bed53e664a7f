"""TorchScript sources with structured outputs (issue 23): a scripted forward that returns a dict
(DeepLabV3's ``{out, aux}``, also filled in a branch), a NamedTuple or a list converts, keeping the keys
as output names. The reference is the eager model, built again from the same seed."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def _ort(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [o.name for o in sess.get_outputs()], sess.run(None, {"x": x})


@pytest.mark.parametrize("kind,names", [("dict", ["out", "aux"]), ("dict_branch", ["out", "aux"]),
                                        ("dict_literal", ["out", "aux"]),
                                        ("namedtuple", ["out", "aux"]), ("list", ["output_0", "output_1"])])
def test_scripted_structured_outputs_convert_with_their_names(tmp_path, cli, kind, names):
    from fixtures import torch_scripted

    src = torch_scripted.save_scripted(tmp_path / f"seg_{kind}.pt", kind, seed=3)
    out = tmp_path / "seg.onnx"
    r = cli("convert", src, "-o", out, "--input", "x:float32:batch,3,32,32", "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["passed"] and rep["data"]["exporter"] == "torch.onnx.export(torchscript)"
    assert rep["data"]["output_names_source"] == ("positional" if kind == "list" else "model")
    assert not any("dynamo" in w for w in rep["warnings"])  # dynamo never takes a ScriptModule: nothing failed
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)  # batch 3: not the traced 2
    got_names, got = _ort(out, x)
    assert got_names == names
    ref = torch_scripted.reference(kind, 3, torch.from_numpy(x))
    ref = [ref[k] for k in ("out", "aux")] if kind.startswith("dict") else list(ref)
    for g, r_ in zip(got, ref):
        np.testing.assert_allclose(g, r_.numpy(), atol=1e-5)


def test_a_dict_with_computed_keys_names_the_real_obstacle(tmp_path, cli):
    from fixtures import torch_scripted

    src = torch_scripted.save_scripted(tmp_path / "seg.pt", "dict_computed")
    out = tmp_path / "seg.onnx"
    r = cli("-q", "convert", src, "-o", out, "--input", "x:float32:batch,3,32,32")
    assert r.code == 4 and "Traceback" not in r.err and not out.exists()
    assert "could not flatten" in r.err and "dict whose keys are constants" in r.err
    assert "ConstraintViolation" not in r.err and "dynamo: not tried: the source is TorchScript" in r.err
