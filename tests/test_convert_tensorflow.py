"""TensorFlow / Keras -> ONNX: every source form converts with parity; bad inputs fail cleanly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

from fixtures import tf_models as T  # noqa: E402

pytestmark = pytest.mark.tensorflow


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every on-disk source form, written once per module."""
    d = tmp_path_factory.mktemp("tf_sources")
    f = {
        "sequential_cnn.keras": T.save_keras(T.sequential_cnn(), d / "sequential_cnn.keras"),
        "two_in_two_out.h5": T.save_keras(T.two_in_two_out(), d / "two_in_two_out.h5"),
        "recurrent.keras": T.save_keras(T.recurrent(), d / "recurrent.keras"),
        "attention_gelu_export": T.save_export(T.attention_gelu(), d / "attention_gelu_export"),
        "bn_dropout.keras": T.save_keras(T.bn_dropout(), d / "bn_dropout.keras"),
        "two_signatures": T.save_two_signatures(d / "two_signatures"),
        "frozen.pb": T.save_frozen_graph(d / "frozen.pb"),
        "ambiguous.pb": T.save_ambiguous_graph(d / "ambiguous.pb"),
        "tf_keras.h5": T.save_tf_keras_h5(d / "tf_keras.h5"),
        "lambda.keras": T.save_keras(T.lambda_model(), d / "lambda.keras"),
        "lambda.h5": T.save_keras(T.lambda_model(), d / "lambda.h5"),
        "custom.keras": T.save_keras(T.custom_layer_model(), d / "custom.keras"),
        "unsupported_export": T.save_export(T.unsupported_op(), d / "unsupported_export"),
    }
    no_pb = d / "no_saved_model_pb"
    no_pb.mkdir()
    (no_pb / "variables").mkdir()
    f["no_saved_model_pb"] = no_pb
    corrupt = d / "corrupt.keras"
    corrupt.write_bytes(f["sequential_cnn.keras"].read_bytes()[:2000])
    f["corrupt.keras"] = corrupt
    import h5py

    with h5py.File(d / "not_a_model.h5", "w") as h:
        h["weights"] = np.zeros(4, dtype="float32")
    f["not_a_model.h5"] = d / "not_a_model.h5"
    return f


def _report(onnx_path: Path) -> dict:
    return json.loads(onnx_path.with_name(onnx_path.stem + ".report.json").read_text())


def _io(onnx_path: Path):
    import onnx

    m = onnx.load(str(onnx_path))
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    return ({i.name: dims(i) for i in m.graph.input}, [o.name for o in m.graph.output], m)


# (fixture, extra CLI args, declared input names, declared output names)
CASES = [
    ("sequential_cnn.keras", [], ["image"], ["logits"]),
    ("two_in_two_out.h5", [], ["image", "meta"], ["cls", "reg"]),
    ("recurrent.keras", [], ["tokens"], ["scores"]),
    ("attention_gelu_export", [], ["x"], ["output_0"]),
    ("bn_dropout.keras", [], ["features"], ["probs"]),
    ("two_signatures", [], ["x"], ["scores", "top"]),
    ("two_signatures", ["--signature", "embed"], ["x"], ["embedding"]),
    ("frozen.pb", [], ["x"], ["probs"]),
    ("ambiguous.pb", ["--output-names", "scores,norm"], ["x"], ["scores", "norm"]),
    ("tf_keras.h5", [], ["x"], ["out"]),
]


@pytest.mark.parametrize("name,args,inputs,outputs", CASES, ids=[c[0] + "".join(c[1][:1]) for c in CASES])
def test_fixture_converts_with_parity(cli, files, tmp_path, name, args, inputs, outputs):
    out = tmp_path / "model.onnx"
    r = cli("convert", files[name], "-o", out, *args)
    assert r.code == 0, r.err
    ins, outs, model = _io(out)
    assert list(ins) == inputs and outs == outputs
    assert all(dims[0] == "batch" for dims in ins.values())  # dynamic batch kept, named
    rep = _report(out)
    assert rep["passed"] and rep["data"]["framework"] == "tensorflow"
    parity = [c["name"] for c in rep["checks"] if c["name"].startswith("parity")]
    assert len(parity) == 2 * len(outputs) and any("batch4" in p for p in parity)
    assert rep["artifact"]["opset"] == 15


def test_exact_gelu_becomes_erf_and_matches_keras(tmp_path):
    """Erfc has no tf2onnx mapping; our handler lowers it to 1 - Erf."""
    from retool.converter.core import convert
    from retool.runtime import make_session

    model = T.attention_gelu(seed=1)
    art, rep = convert(model, tmp_path / "gelu.onnx")
    _, _, m = _io(art.path)
    ops = {n.op_type for n in m.graph.node}
    assert "Erf" in ops and "Erfc" not in ops
    x = np.random.default_rng(3).standard_normal((3, 10, 16)).astype("float32")
    got = make_session(art.path).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, model(x, training=False).numpy(), atol=1e-4)


def test_sequential_in_memory_needs_no_wrapping(tmp_path):
    from retool.converter.core import convert
    from retool.runtime import make_session

    model = T.sequential_cnn()
    art, rep = convert(model, tmp_path / "seq.onnx")
    assert rep.passed and [s.name for s in art.inputs] == ["image"] and [s.name for s in art.outputs] == ["logits"]
    assert art.outputs[0].shape == ("batch", 10)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(make_session(art.path).run(None, {"image": x})[0], model(x).numpy(), atol=1e-4)


def test_inputs_as_nchw(cli, files, tmp_path):
    from retool.runtime import make_session

    out = tmp_path / "nchw.onnx"
    r = cli("convert", files["sequential_cnn.keras"], "-o", out, "--inputs-as-nchw")
    assert r.code == 0, r.err
    ins, _, _ = _io(out)
    assert ins["image"] == ["batch", 3, 32, 32]
    model = T.sequential_cnn()
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype("float32")
    got = make_session(out).run(None, {"image": x})[0]
    np.testing.assert_allclose(got, model(np.transpose(x, (0, 2, 3, 1))).numpy(), atol=1e-4)


@pytest.mark.parametrize("opset", [13, 18])
def test_opset_choice(cli, files, tmp_path, opset):
    out = tmp_path / "m.onnx"
    assert cli("convert", files["frozen.pb"], "-o", out, "--opset", opset).code == 0
    assert _report(out)["artifact"]["opset"] == opset


def test_tf_function_and_tf_keras_in_memory(tmp_path):
    import tensorflow as tf

    from retool.converter.core import convert

    w = tf.constant(np.random.default_rng(0).standard_normal((5, 3)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32, name="feat")])
    def f(feat):
        return tf.nn.relu(feat @ w)

    art, rep = convert(f, tmp_path / "f.onnx")
    assert rep.passed and [s.name for s in art.inputs] == ["feat"] and art.inputs[0].shape == ("batch", 5)

    @tf.function
    def g(a, b):
        return {"sum": a + b, "prod": a * b}

    art, rep = convert(g, tmp_path / "g.onnx", inputs=["a:float32:batch,3", "b:float32:batch,3"])
    assert rep.passed and [s.name for s in art.outputs] == ["sum", "prod"]

    art, rep = convert(T.tf_keras_model(), tmp_path / "tfk.onnx")
    assert rep.passed and [s.name for s in art.outputs] == ["out"]


def test_loaded_saved_model_object(files, tmp_path):
    import tensorflow as tf

    from retool.converter.core import convert

    obj = tf.saved_model.load(str(files["two_signatures"]))
    art, rep = convert(obj, tmp_path / "o.onnx", options={"signature": "embed"})
    assert rep.passed and [s.name for s in art.outputs] == ["embedding"]


def test_parity_mismatch_fails_with_6_and_writes_nothing(tmp_path):
    """A model that samples noise cannot match its ONNX twin: exit 6, no ONNX file, a report saying why."""
    import tensorflow as tf

    from retool.converter.core import convert
    from retool.errors import ValidationFailed

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def noisy(x):
        return x + tf.random.uniform(tf.shape(x))

    out = tmp_path / "noisy.onnx"
    with pytest.raises(ValidationFailed) as info:
        convert(noisy, out)
    assert info.value.exit_code == 6 and not out.exists()
    assert not _report(out)["passed"]


# -- Keras safe mode --------------------------------------------------------------

@pytest.mark.parametrize("name", ["lambda.keras", "lambda.h5"])
def test_lambda_needs_trust(cli, files, tmp_path, name):
    out = tmp_path / "l.onnx"
    r = cli("convert", files[name], "-o", out)
    assert r.code == 2 and "Lambda" in r.err and "--trust-remote-code" in r.err and not out.exists()
    r = cli("convert", files[name], "-o", out, "--trust-remote-code")
    assert r.code == 0, r.err
    assert _report(out)["passed"]


def test_custom_objects_need_trust_and_the_class(cli, files, tmp_path):
    out = tmp_path / "c.onnx"
    src = files["custom.keras"]
    r = cli("convert", src, "-o", out)
    assert r.code == 2 and "Scale" in r.err and "--custom-objects" in r.err
    r = cli("convert", src, "-o", out, "--custom-objects", "fixtures.tf_models:Scale")
    assert r.code == 2 and "--trust-remote-code" in r.err and not out.exists()
    r = cli("convert", src, "-o", out, "--custom-objects", "fixtures.tf_models:Scale", "--trust-remote-code")
    assert r.code == 0, r.err
    assert _report(out)["passed"]


# -- bad inputs ----------------------------------------------------------------------

BAD = [
    ("no_saved_model_pb", [], 2, "saved_model.pb is missing"),
    ("corrupt.keras", [], 4, "not a valid .keras archive"),
    ("not_a_model.h5", [], 4, "no model_config"),
    ("two_signatures", ["--signature", "nope"], 2, "available: embed, serving_default"),
    ("ambiguous.pb", [], 2, "candidates: scores, norm"),
    ("ambiguous.pb", ["--output-names", "missing"], 2, "not nodes of the graph"),
    ("unsupported_export", [], 4, "op Lgamma in layer/node unsupported_1/log_gamma"),
    ("frozen.pb", ["--opset", "12"], 2, "opsets 13-18"),
]


@pytest.mark.parametrize("name,args,code,text", BAD, ids=[f"{b[0]}{''.join(b[1][:1])}" for b in BAD])
def test_bad_input(cli, files, tmp_path, name, args, code, text):
    out = tmp_path / "bad.onnx"
    r = cli("convert", files[name], "-o", out, *args)
    assert r.code == code, r.err
    errors = [line for line in r.err.splitlines() if line.startswith("retool: error:")]
    assert len(errors) == 1 and text in errors[0] and str(files[name].name) in errors[0]
    assert "Traceback" not in r.err
    assert list(tmp_path.iterdir()) == []  # nothing at -o, no staging leftovers


# -- as a new user would --------------------------------------------------------------

@pytest.mark.slow
def test_cli_subprocess_quiet_and_clean(files, tmp_path, run_retool_subprocess):
    out = tmp_path / "cnn.onnx"
    p = run_retool_subprocess("convert", files["sequential_cnn.keras"], "-o", out)
    assert p.returncode == 0, p.stderr
    assert out.exists() and "parity:logits@batch4" in p.stdout
    for noise in ("cudart", "oneDNN", "absl", "tf2onnx", "WARNING"):
        assert noise not in p.stderr, p.stderr
    p = run_retool_subprocess("convert", files["unsupported_export"], "-o", tmp_path / "u.onnx")
    assert p.returncode == 4 and "Traceback" not in p.stderr and "Lgamma" in p.stderr
    assert not (tmp_path / "u.onnx").exists()
    # a fresh interpreter has not imported the custom layer: the error says which --custom-objects to pass
    p = run_retool_subprocess("convert", files["custom.keras"], "-o", tmp_path / "c.onnx", "--trust-remote-code")
    assert p.returncode == 2 and "--custom-objects fixtures.tf_models:Scale" in p.stderr, p.stderr


def test_help_and_sniff_do_not_import_tensorflow(files):
    code = (
        "import sys\n"
        "from retool.cli import main\n"
        "from retool.registry import CONVERTERS\n"
        "c = CONVERTERS.get('tensorflow')\n"
        f"reasons = [c.sniff(p) for p in {[str(files[k]) for k in ('sequential_cnn.keras', 'two_signatures', 'frozen.pb', 'tf_keras.h5')]}]\n"
        "assert all(reasons), reasons\n"
        "try:\n    main(['convert', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('TF_LOADED' if 'tensorflow' in sys.modules else 'TF_NOT_LOADED')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "TF_NOT_LOADED" in p.stdout
