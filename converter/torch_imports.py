"""Tell an unpickled model's broken dependency from a corrupt file.

Unpickling a whole ``nn.Module`` imports the modules its classes live in. When
one of them raises while being imported (PyPI's CUDA torchvision beside a CPU
torch raises ``RuntimeError: operator torchvision::nms does not exist``), the
file is fine and the environment is not: exit 3, naming the package and the fix.
"""
from __future__ import annotations

import traceback
from pathlib import Path

from retool.errors import BrokenDependency, first_line


def import_failure(exc: BaseException) -> str | None:
    """The module whose import-time code raised ``exc`` (outermost first), or None."""
    seen = 0
    while exc is not None and seen < 5:
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            if frame.f_code.co_name == "<module>":
                name = frame.f_globals.get("__name__")
                if name and name != "__main__":
                    return str(name)
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def broken_import_error(path: Path, module: str, exc: BaseException, torch_version: str) -> BrokenDependency:
    pkg = module.split(".")[0]
    return BrokenDependency(
        f"{path}: the pickled model needs package {pkg!r}, which is installed but fails to import "
        f"({type(exc).__name__}: {first_line(exc, limit=200)}); the file itself is not at fault. "
        f"Fix the environment: reinstall a {pkg} build made for torch {torch_version} (a CPU torch needs a "
        f"CPU {pkg}), check with: python -c 'import {pkg}'", pkg)
