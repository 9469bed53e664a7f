"""Human output: progress lines on stderr and small tables on stdout."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator, Sequence

_quiet = False


def set_quiet(value: bool) -> None:
    global _quiet
    _quiet = value


def info(msg: str) -> None:
    if not _quiet:
        print(msg, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(msg: str) -> Iterator[None]:
    """Progress for a step that may take more than a moment."""
    t0 = time.perf_counter()
    if not _quiet:
        print(f"• {msg} …", end="", file=sys.stderr, flush=True)
    try:
        yield
    except BaseException:
        if not _quiet:
            print(" failed", file=sys.stderr, flush=True)
        raise
    if not _quiet:
        print(f" done ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
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
