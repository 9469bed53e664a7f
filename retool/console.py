"""Human output: progress lines on stderr and small tables on stdout."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator, Sequence

_quiet = False
#: Pipeline workers share stderr with the driver and each other: they print whole lines only
#: (a step says "• msg … done" once, at its end), so lines from two processes never run together.
_whole_lines = False
#: Steps whose "• msg …" line is still open, and whether something was printed after it.
_open: list[str] = []
_broken = [False]


def set_quiet(value: bool) -> None:
    global _quiet
    _quiet = value


def is_quiet() -> bool:
    return _quiet


@contextlib.contextmanager
def whole_lines() -> Iterator[None]:
    """Whole lines only while this runs (a pipeline driver: its workers write to the same stderr)."""
    global _whole_lines
    before, _whole_lines = _whole_lines, True
    try:
        yield
    finally:
        _whole_lines = before


def worker_init(quiet: bool) -> None:
    """In a pipeline worker process: the driver's -q, and whole lines only."""
    global _whole_lines
    set_quiet(quiet)
    _whole_lines = True


def _line(text: str) -> None:
    """One write per line: a line is never split by another process's output."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _end_open_line() -> None:
    if _open and not _broken[0]:
        sys.stderr.write("\n")
        _broken[0] = True


def info(msg: str) -> None:
    if not _quiet:
        _end_open_line()
        _line(msg)


def warn(msg: str) -> None:
    _end_open_line()
    _line(f"warning: {msg}")


@contextlib.contextmanager
def step(msg: str) -> Iterator[None]:
    """Progress for a step that may take more than a moment."""
    t0 = time.perf_counter()
    inline = not _quiet and not _whole_lines
    if inline:
        _end_open_line()
        sys.stderr.write(f"• {msg} …")
        sys.stderr.flush()
        _open.append(msg)
        _broken[0] = False

    def close(word: str) -> None:
        if _quiet:
            return
        if not inline:
            _line(f"• {msg} … {word}")
            return
        _open.pop()
        if _broken[0]:  # other lines came in between: say which step ended
            _line(f"• {msg} … {word}")
        else:
            _line(f" {word}")
        _broken[0] = bool(_open)  # an outer step's line is no longer the current one

    try:
        yield
    except BaseException:
        close("failed")
        raise
    close(f"done ({time.perf_counter() - t0:.1f}s)")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]  # no trailing spaces
    return "\n".join([line, sep, *body])


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return "PASS" if v else "FAIL"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def checks_table(checks) -> str:
    rows = []
    for c in checks:
        d = c.details or {}
        rows.append([c.name, c.passed, d.get("max_abs"), d.get("max_rel"), d.get("cosine"), d.get("top1"),
                     c.message])
    return table(["check", "result", "max_abs", "max_rel", "cosine", "top1", "note"], rows)
