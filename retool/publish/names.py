"""Names that become folders and keys in a model repository: validate before touching anything."""
from __future__ import annotations

import re

from retool.errors import UsageError

#: What retool writes in a model's folder beside its version folders (Triton reads config.pbtxt).
CONFIG = "config.pbtxt"
ALIASES = "aliases.json"
#: serving profiles measured after publish (retool run's serve step, repo configure): version -> settings
SERVING = "serving.json"

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


#: Triton reads version folders as int64 (std::stoll); a larger name aborts it on the whole repository.
MAX_VERSION = 2**63 - 1
#: config.pbtxt's max_batch_size is an int32 field: anything larger does not parse, with Triton or with verify.
MAX_BATCH_SIZE = 2**31 - 1
#: Each instance is a full copy of the model (and, with the Python-based backend, a process); more than
#: this on one server exhausts memory and process limits long before it helps throughput.
MAX_INSTANCES = 1024


def ascii_digits(text) -> bool:
    """'0'-'9' only: str.isdigit() also says yes to '²' and '٣', which int() then refuses or misreads."""
    t = str(text)
    return bool(t) and t.isascii() and t.isdigit()


def version_of(folder: str) -> int | None:
    """The version a folder name denotes when it is one Triton reads the same way (canonical: no leading
    zero, ASCII digits, within int64); None for anything else ('01', '²', 'README')."""
    if not ascii_digits(folder) or folder[0] == "0" or len(folder) > 19:
        return None
    v = int(folder)
    return v if v <= MAX_VERSION else None


def triton_reads_as_version(folder: str) -> bool:
    """Triton turns a version folder's name into a number with std::stoll, which skips leading blanks and
    a sign and stops at the first non-digit: '01', '1.bak' and ' +1' all become version 1 there, and a
    number beyond int64 throws and fails the whole repository."""
    return re.match(r"[ \t\n\v\f\r]*[+-]?[0-9]", str(folder), flags=re.ASCII) is not None


def check_version(version) -> int:
    """A Triton version folder: a positive integer within int64."""
    text = str(version).strip()
    v = int(text) if ascii_digits(text) else -1
    if v < 1:
        raise UsageError(f"version {version!r}: a version is a positive integer such as 3 (or 'auto')")
    if v > MAX_VERSION:
        raise UsageError(f"version {version!r}: Triton reads versions as 64-bit integers, so at most {MAX_VERSION}; "
                         f"use --version auto")
    return v


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_max_batch_size(value, flag: str = "--max-batch-size") -> int:
    if not _whole(value) or not 0 <= value <= MAX_BATCH_SIZE:
        raise UsageError(f"{flag} {value!r}: must be a whole number from 0 (no batching) to {MAX_BATCH_SIZE} "
                         f"(Triton's max_batch_size is a 32-bit field)")
    return value


def check_instances(value, flag: str = "--instances") -> int:
    if not _whole(value) or not 1 <= value <= MAX_INSTANCES:
        raise UsageError(f"{flag} {value!r}: must be a whole number from 1 to {MAX_INSTANCES} (Triton needs at "
                         f"least one model instance; each one is a full copy of the model)")
    return value
