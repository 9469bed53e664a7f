"""One exception hierarchy; each class carries the process exit code.

The CLI prints ``str(error)`` as one line on stderr and exits with
``error.exit_code``. Anything that is not a RetoolError is a bug and keeps
its traceback (exit code 1).
"""
from __future__ import annotations


class RetoolError(Exception):
    """Base of every error retool expects and explains."""

    exit_code = 1
    #: Short label used in reports and JSON output.
    kind = "error"

    def __init__(self, message: str, *, report=None):
        super().__init__(message)
        self.message = message
        #: Optional Report describing what failed (parity table, gate table ...).
        self.report = report

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split("\n")) if "\n" in self.message else self.message


class UsageError(RetoolError):
    """Bad flags, missing or unreadable files, bad paths: the user can fix the call."""

    exit_code = 2
    kind = "usage"


class TrustRequired(UsageError):
    """Loading this file would execute code; needs --trust-remote-code."""

    kind = "trust"


class MissingDependency(RetoolError):
    """An optional framework is not installed; the message names the extra."""

    exit_code = 3
    kind = "missing-dependency"

    def __init__(self, package: str, extra: str, purpose: str = ""):
        what = f" to {purpose}" if purpose else ""
        super().__init__(
            f"{package} is needed{what} but is not installed; "
            # not 'pip install retool[...]': that name on PyPI is another project
            f"run in the retool checkout: pip install -c constraints.txt '.[{extra}]'"
        )
        self.package = package
        self.extra = extra


class BrokenDependency(MissingDependency):
    """A package is installed but fails when imported: an environment problem, like a missing one."""

    def __init__(self, message: str, package: str):
        RetoolError.__init__(self, message)
        self.package = package
        self.extra = ""


class ConversionError(RetoolError):
    exit_code = 4
    kind = "conversion"


class OptimizationError(RetoolError):
    exit_code = 5
    kind = "optimization"


class ValidationFailed(RetoolError):
    """A validation gate failed (parity, latency, size ...)."""

    exit_code = 6
    kind = "validation"


class PublishError(RetoolError):
    exit_code = 7
    kind = "publish"


class ModelLoadError(PublishError):
    """Triton refused to load a published model (bad config, missing file); the message is Triton's reason."""

    kind = "model-load"


class UnsafePath(PublishError):
    """Repository content names a path outside its root (absolute, '..', empty segments, a symlink out)."""

    kind = "unsafe-path"


class ServingError(RetoolError):
    """The inference server could not start or died; the message carries its log's reason."""

    exit_code = 8
    kind = "serving"


class ServingTimeout(ServingError):
    """The server or a model did not become ready in time."""

    exit_code = 9
    kind = "serving-timeout"


def first_line(exc: BaseException, limit: int | None = 400, with_type: bool = False) -> str:
    """The first non-blank line of an exception's message, for one-line errors and reports."""
    text = str(exc).strip()
    line = next((l.strip() for l in text.splitlines() if l.strip()), "")
    if not line:
        return type(exc).__name__
    line = line[:limit] if limit else line
    return f"{type(exc).__name__}: {line}" if with_type else line


EXIT_CODES = {
    0: "ok",
    1: "unexpected error (a bug: please report it with the traceback)",
    UsageError.exit_code: "usage error",
    MissingDependency.exit_code: "missing optional dependency",
    ConversionError.exit_code: "conversion failed",
    OptimizationError.exit_code: "optimisation failed",
    ValidationFailed.exit_code: "a validation gate failed",
    PublishError.exit_code: "publish failed",
    ServingError.exit_code: "the inference server failed",
    ServingTimeout.exit_code: "the inference server or a model was not ready in time",
}
