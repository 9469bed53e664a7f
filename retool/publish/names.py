"""Names that become folders and keys in a model repository: validate before touching anything."""
from __future__ import annotations

import re

from retool.errors import UsageError

# Triton uses the model name as a folder name and in URLs (/v2/models/<name>); keep to a portable set.
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ALIAS = re.compile(r"[a-z][a-z0-9_-]{0,63}")


def check_model_name(name: str) -> str:
    text = str(name)
    if text in ("", ".", "..") or "/" in text or "\\" in text or "\x00" in text or ".." in text:
        raise UsageError(f"model name {text!r}: path separators and '..' are not allowed; "
                         f"use letters, digits, '_', '-' and '.' such as resnet50_int8")
    if not _MODEL.fullmatch(text):
        raise UsageError(f"model name {text!r}: must start with a letter or digit and use only letters, digits, "
                         f"'_', '-' and '.' (at most 128 characters), e.g. resnet50_int8")
    return text


def check_alias(alias: str) -> str:
    text = str(alias)
    if not _ALIAS.fullmatch(text):
        raise UsageError(f"alias {text!r}: use lower-case letters, digits, '_' and '-', starting with a letter, "
                         f"e.g. production or staging")
    return text


def check_version(version) -> int:
    """A Triton version folder: a positive integer."""
    try:
        v = int(str(version).strip())
    except ValueError:
        v = -1
    if v < 1 or str(version).strip().startswith("+"):
        raise UsageError(f"version {version!r}: a version is a positive integer such as 3 (or 'auto')")
    return v
