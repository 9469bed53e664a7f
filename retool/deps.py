"""Lazy imports of heavy or optional frameworks."""
from __future__ import annotations

import importlib
import os
from types import ModuleType

from retool.errors import MissingDependency


def require(module: str, extra: str, purpose: str = "", package: str | None = None) -> ModuleType:
    """Import ``module`` or raise MissingDependency naming ``retool[extra]``."""
    if module in ("tensorflow", "tf2onnx", "keras", "tf_keras"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        # A broken install of a present package is not "missing": let it surface.
        if getattr(exc, "name", None) and not module.startswith(exc.name.split(".")[0]):
            raise
        raise MissingDependency(package or module.split(".")[0], extra, purpose) from None


def version_of(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
