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
#: What the current job is about ("torch-cnn/cpu-int8"): every step line names it.
_labels: list[str] = []
#: Live progress bars (retool/progress.py) now on the terminal.
_bars: list = []


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


@contextlib.contextmanager
def labelled(label: str) -> Iterator[None]:
    """Every step line inside names ``label`` (a pipeline job's model and target)."""
    _labels.append(label)
    try:
        yield
    finally:
        _labels.pop()


def _named(msg: str) -> str:
    if _labels and not msg.startswith(_labels[-1]):
        return f"{_labels[-1]}: {msg}"
    return msg


def _line(text: str) -> None:
    """One write per line: a line is never split by another process's output."""
    if _bars:
        from retool.progress import write

        write(text)
        return
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


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
def step(msg: str, estimate_s: float | None = None) -> Iterator[None]:
    """Progress for a step that may take more than a moment: a live bar while stderr is a terminal,
    else plain lines; one "• msg … done (Ns)" line at its end either way (nothing with -q)."""
    t0 = time.perf_counter()
    msg = _named(msg)
    inline = not _quiet and not _whole_lines
    if inline and _terminal():
        with _live(msg, estimate_s, t0):
            yield
        return
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


@contextlib.contextmanager
def _live(msg: str, estimate_s: float | None, t0: float) -> Iterator[None]:
    from retool.progress import Bar

    _end_open_line()
    bar = Bar(msg, estimate_s)
    _bars.append(bar)
    word = "failed"
    try:
        yield
        word = f"done ({time.perf_counter() - t0:.1f}s)"
    finally:
        bar.close()
        _bars.remove(bar)
        _line(f"• {msg} … {word}")


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
