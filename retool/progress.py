"""A live progress bar for a console step while stderr is a terminal (tqdm, imported on use).

A step's length is rarely known in advance: the bar shows the step and its elapsed time, and when the
caller gives an estimate (``console.step(msg, estimate_s=...)``) a bar with the time left. A thread
redraws it twice a second, so a step that reports no progress of its own still shows it is alive."""
from __future__ import annotations

import sys
import threading
import time


class Bar:
    def __init__(self, msg: str, estimate_s: float | None = None):
        from tqdm import tqdm

        self.t0 = time.perf_counter()
        fmt = ("• {desc} {bar:20} {elapsed} (about {remaining} left)" if estimate_s
               else "• {desc} … {elapsed}")
        size = _fixed_size()  # a terminal that reports no size (0x0) gets 80x24: tqdm would draw nothing
        self.bar = tqdm(total=float(estimate_s) if estimate_s else None, desc=msg, file=sys.stderr, leave=False,
                        bar_format=fmt, dynamic_ncols=size is None, ncols=size and size[0],
                        nrows=size and size[1], mininterval=0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            if self.bar.total:  # time as progress, held short of the end until the step really ends
                self.bar.n = min(time.perf_counter() - self.t0, self.bar.total * 0.99)
            self.bar.refresh()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.bar.close()


def _fixed_size() -> tuple[int, int] | None:
    """None when the terminal reports its size (tqdm follows it), else 80x24."""
    import os

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
        return None if size.columns and size.lines else (80, 24)
    except (OSError, ValueError, AttributeError):
        return (80, 24)


def write(line: str) -> None:
    """A whole line above the live bars."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)
