"""Resolve ``package.module:attr`` or ``path/file.py:attr`` references to Python objects."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from retool.errors import UsageError


def ensure_importable(*folders) -> None:
    """Put ``folders`` (default: the current folder) on sys.path, as ``python -m`` does for the
    current folder, so a model's own packages import."""
    cwd = str(Path.cwd())
    for f in folders or (cwd,):
        f = str(f)
        if f not in sys.path and not (f == cwd and "" in sys.path):
            sys.path.insert(0, f)


def package_root(ref: str, start) -> Path | None:
    """The nearest of ``start`` and its parents holding the top-level package of ``package.module:attr``.

    A pipeline file names ``fixtures.models:cnn`` relative to itself, wherever it is run from."""
    mod = ref.rpartition(":")[0]
    if not mod or mod.endswith(".py") or "/" in mod:
        return None
    top = mod.split(".")[0]
    if not top.isidentifier():
        return None
    start = Path(start).resolve()
    for d in (start, *start.parents):
        if (d / top).is_dir() or (d / f"{top}.py").is_file():
            return d
    return None


def import_ref(ref: str, label: str = "") -> object:
    """The object ``ref`` names. Importing runs the module's code: the user named it explicitly.

    The current folder is importable, as with ``python -m``. ``label`` prefixes error messages
    (e.g. ``--custom-objects``).
    """
    prefix = f"{label} {ref}" if label else ref
    mod_name, _, attr = ref.rpartition(":")
    if not mod_name or not attr:
        raise UsageError(f"{prefix}: expected MODULE:ATTR, e.g. mypkg.models:build")
    try:
        if mod_name.endswith(".py"):
            p = Path(mod_name)
            if not p.exists():
                raise UsageError(f"{prefix}: file {p} not found")
            spec = importlib.util.spec_from_file_location(p.stem, p)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            ensure_importable()
            module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise UsageError(f"{prefix}: cannot import {mod_name} ({exc}); check the name and the current folder") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{prefix}: {mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
