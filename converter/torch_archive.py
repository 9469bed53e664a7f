"""Torch model archives read as zip files, without importing torch: which kind a file is, and whether a
TorchScript archive could declare its inputs at all."""
from __future__ import annotations

import zipfile
from pathlib import Path

from retool.errors import UsageError

TORCH_SUFFIXES = (".pt", ".pth", ".pt2", ".ts", ".torchscript", ".bin")


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def classify_file(path: Path) -> str | None:
    """torchscript | exported_program | pickle | None, from the zip layout (no torch import)."""
    names = _zip_names(path)
    if not names:
        return None
    base = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if any(n.endswith("archive_format") for n in names) or any("/models/" in n and n.endswith(".json") for n in names):
        return "exported_program"
    if "constants.pkl" in base or any(n.startswith("code/") or "/code/" in n for n in names):
        return "torchscript"
    if "data.pkl" in base:
        return "pickle"
    return None


NO_INPUTS = ("{label}: the model does not declare its inputs; give them with --input NAME:DTYPE:SHAPE "
             "(e.g. --input x:float32:batch,3,224,224) or --example-inputs FILE.npz")


def _mentions(path: Path, word: bytes) -> bool:
    """Whether ``word`` occurs in the archive's pickles or code (tensor storages under data/ are skipped)."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if "/data/" in info.filename or info.filename.startswith("data/"):
                    continue
                if word in z.read(info):
                    return True
    except (zipfile.BadZipFile, OSError):
        return True  # unreadable here: let the loader say what is wrong
    return False


def undeclared_inputs_error(request) -> UsageError | None:
    """The missing --input error, found before torch is imported: a TorchScript archive with no
    ``retool_inputs`` attribute and no --input/--example-inputs can only end there."""
    src = request.source
    if request.inputs or request.example_inputs or not isinstance(src, (str, Path)):
        return None
    path = Path(src)
    if not path.is_file() or classify_file(path) != "torchscript" or _mentions(path, b"retool_inputs"):
        return None
    return UsageError(NO_INPUTS.format(label=request.source_label))
