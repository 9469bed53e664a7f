"""Shared test fixtures: models are built at test time from fixtures/, with seeds."""
from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `fixtures.*` imports like it does for a user in the repo root
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module", autouse=True)
def _freeze_the_long_lived_heap():
    """At each module's start, move what is alive (torch, tensorflow, transformers, onnxscript's
    torchlib, session fixtures ...) out of the cyclic collector's reach.

    Those objects live on, yet every full collection walks them again: the TF converter collects
    before each of tf2onnx's ~24 optimizer passes (to bound peak memory), and over this heap each
    pass cost 0.4-1 s, so a tiny Keras model took 10-17 s to convert instead of 0.5-3 s. After a
    full collection what is left is alive; frozen objects are still freed by reference counting,
    only cycles among them wait. Garbage the tests make is collected as before."""
    gc.collect()
    gc.freeze()


#: the longest files start first, so that at the end of `make test` one worker does not wait on them alone
_LONG_FIRST = ("test_demo.py", "test_decoder_families.py", "test_decoder_fused.py", "test_convert_seq2seq.py",
               "test_decoder_int4.py", "test_decoder_llm.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_sessionfinish(session, exitstatus):
    # hand the frozen objects back, so interpreter shutdown collects them (else nanobind-based
    # modules such as onnxsim report "leaked instances" at exit)
    gc.unfreeze()
    gc.collect()


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run the retool CLI in-process: cli("convert", ...) -> CliResult(code, out, err)."""
    from retool.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return run


@pytest.fixture
def run_retool_subprocess():
    """``run_retool_subprocess(*args)`` runs ``retool`` in a fresh interpreter, as a user would.

    Test modules can also ``from fixtures.proc import run_retool`` (conftest is not importable
    under --import-mode=importlib).
    """
    from fixtures.proc import run_retool

    return run_retool


@pytest.fixture(scope="session")
def onnx_models(tmp_path_factory):
    """fp32 ONNX exports of the torch fixture CNN and transformer encoder (built once per session)."""
    pytest.importorskip("torch")
    from fixtures import torch_models
    from retool.converter.core import convert

    d = tmp_path_factory.mktemp("onnx_models")
    out = {}
    for name, factory in (("cnn", torch_models.cnn), ("transformer", torch_models.transformer)):
        art, _ = convert(factory(), d / f"{name}.onnx", inputs=factory().retool_inputs)
        out[name] = art.path
    return out


@pytest.fixture(scope="session")
def cnn_onnx(onnx_models) -> Path:
    return onnx_models["cnn"]


@pytest.fixture(scope="session")
def transformer_onnx(onnx_models) -> Path:
    return onnx_models["transformer"]
