"""retool: convert, optimise, prove and publish models for production serving.

The stage functions are imported lazily so ``import retool`` stays cheap.
"""
from __future__ import annotations

__version__ = "0.1.0"

import warnings as _warnings

# torch's own internals (the ONNX exporter probing torch.distributed) trip this on every convert;
# it is not about anything the user wrote, so it is not shown, -q or not.
_warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op.*", category=FutureWarning)

_LAZY = {
    "convert": "retool.converter.core:convert",
    "optimize": "retool.optimizers.core:optimize",
    "validate": "retool.validators.core:validate",
    # a subpackage: importing it makes ``retool.publish`` the module, so expose the module itself
    # (``retool.publish.publish(...)``) rather than a function it would shadow.
    "publish": "retool.publish",
    "run": "retool.pipeline:run",
    "TensorSpec": "retool.types:TensorSpec",
    "ModelArtifact": "retool.types:ModelArtifact",
    "ProvenanceStep": "retool.types:ProvenanceStep",
    "CheckResult": "retool.types:CheckResult",
    "Report": "retool.types:Report",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, _, attr = _LAZY[name].partition(":")
        mod = importlib.import_module(module)
        return getattr(mod, attr) if attr else mod
    raise AttributeError(f"module 'retool' has no attribute {name!r}")
