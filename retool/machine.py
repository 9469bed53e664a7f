"""How busy the machine was while retool timed something: recorded with every figure.

Every timed block (validators.latency.measure_interleaved) runs inside :func:`watch`,
which reads ``/proc/stat`` before and after and this process's CPU time, giving

* ``steal_pct``: CPU time the hypervisor gave to other guests (a VM's noisy neighbours);
* ``others_cpu_pct``: the share of all CPUs that *other* processes used during the block;
* ``loadavg``: the 1/5/15-minute load averages at its end.

:func:`during` sums the blocks of one stage (validate, optimize, a bench section) into the
``machine`` section of its report, with ``busy`` set when the load average exceeded the
cores, or others used more than half of them, and the advice to follow then.

The readers are injectable (:func:`use_readers`): tests simulate ``/proc/loadavg`` instead
of loading the machine. Off Linux the fields are None and ``busy`` is False.
"""
from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

#: ISA extensions that decide which int8 / fp16 kernels onnxruntime can use
ISA = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "f16c", "asimd", "asimddp", "i8mm")
BUSY_OTHERS_PCT = 50.0
ADVICE = ("figures taken on a busy machine (load above its cores, or other processes using over half the CPUs): "
          "rerun on a quiet machine, or pin threads (taskset -c, --threads 1); decisions used intervals, and the "
          "undecided ones say so")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass(frozen=True)
class Readers:
    """Where the figures come from; tests replace these."""

    loadavg: Callable[[], str | None] = lambda: _read("/proc/loadavg")
    stat: Callable[[], str | None] = lambda: _read("/proc/stat")
    cpuinfo: Callable[[], str | None] = lambda: _read("/proc/cpuinfo")
    governor: Callable[[], str | None] = lambda: _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    cpus: Callable[[], int] = _cpus
    total_cpus: Callable[[], int] = lambda: os.cpu_count() or 1
    own_cpu_s: Callable[[], float] = _own_cpu_s
    clock: Callable[[], float] = time.monotonic


_readers = Readers()
_lock = threading.Lock()
_blocks: list[dict] = []
_MAX_BLOCKS = 256


@contextlib.contextmanager
def use_readers(**kw) -> Iterator[Readers]:
    """Replace some readers for the duration (tests: ``use_readers(loadavg=lambda: "9 9 9 1/9 1")``)."""
    global _readers
    old = _readers
    _readers = replace(old, **kw)
    try:
        yield _readers
    finally:
        _readers = old


def loadavg(r: Readers | None = None) -> list[float] | None:
    text = (r or _readers).loadavg()
    try:
        return [round(float(x), 2) for x in text.split()[:3]] if text else None
    except ValueError:
        return None


def _cpu_counters(r: Readers) -> list[int] | None:
    """The aggregate "cpu" line of /proc/stat: user nice system idle iowait irq softirq steal (jiffies)."""
    text = r.stat()
    if not text:
        return None
    for line in text.splitlines():
        if line.startswith("cpu "):
            vals = [int(x) for x in line.split()[1:]]
            return (vals + [0] * 8)[:8]
    return None


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(CPU model, ISA flags) from /proc/cpuinfo's text (x86's 'model name'/'flags', Arm's 'Model'/'Features')."""
    model, flags = platform.processor() or platform.machine(), set()
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware") and model in ("", platform.machine(), platform.processor()):
            model = val.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(val.split())
    return model, flags


def static_info(r: Readers | None = None) -> dict:
    """CPU model, ISA extensions and frequency governor, where readable."""
    r = r or _readers
    model, flags = parse_cpuinfo(r.cpuinfo() or "")
    gov = r.governor()
    return {"cpu_model": model, "isa": [f for f in ISA if f in flags], "governor": gov.strip() if gov else None,
            "cores": r.cpus(), "cores_total": r.total_cpus()}


@dataclass
class Block:
    """One timed block's start readings; :meth:`end` gives its figures."""

    r: Readers
    t0: float = 0.0
    own0: float = 0.0
    stat0: list[int] | None = None
    result: dict = field(default_factory=dict)

    def start(self) -> "Block":
        self.t0, self.own0, self.stat0 = self.r.clock(), self.r.own_cpu_s(), _cpu_counters(self.r)
        return self

    def end(self) -> dict:
        wall = max(self.r.clock() - self.t0, 1e-9)
        own = max(self.r.own_cpu_s() - self.own0, 0.0)
        stat1 = _cpu_counters(self.r)
        out: dict = {"seconds": round(wall, 3), "loadavg": loadavg(self.r), "cores": self.r.cpus(),
                     "steal_pct": None, "others_cpu_pct": None, "own_cpu_pct": None}
        if self.stat0 and stat1:
            d = [b - a for a, b in zip(self.stat0, stat1)]
            total = sum(d)
            if total > 0:
                idle = d[3] + d[4]
                busy_share = (total - idle - d[7]) / total
                # this process's share of all CPUs over the block (its own CPU seconds / (wall x CPUs))
                own_share = min(own / (wall * self.r.total_cpus()), busy_share)
                out.update(steal_pct=round(100.0 * d[7] / total, 1),
                           others_cpu_pct=round(100.0 * max(busy_share - own_share, 0.0), 1),
                           own_cpu_pct=round(100.0 * own_share, 1))
        self.result = out
        return out


@contextlib.contextmanager
def watch(label: str = "") -> Iterator[Block]:
    """Record the machine's state around a timed block (kept for :func:`during`)."""
    b = Block(_readers).start()
    try:
        yield b
    finally:
        rec = {"label": label, "at": b.t0, **b.end()}
        with _lock:
            _blocks.append(rec)
            del _blocks[:-_MAX_BLOCKS]


def busy(load: list[float] | None, cores: int, others_pct: float | None = None) -> bool:
    """Busier than its cores: a 1-minute load above the cores, or others using over half the CPUs."""
    return bool((load and load[0] > cores) or (others_pct is not None and others_pct > BUSY_OTHERS_PCT))


def state(r: Readers | None = None) -> dict:
    """The machine now (no timed block): load, cores, CPU, and the busy flag."""
    r = r or _readers
    load = loadavg(r)
    info = static_info(r)
    b = busy(load, info["cores"])
    return {**info, "loadavg": load, "steal_pct": None, "others_cpu_pct": None, "busy": b,
            "advice": ADVICE if b else None, "blocks": 0}


def during(since: float | None = None) -> dict:
    """The machine over the timed blocks that started at or after ``since`` (a ``Readers.clock``
    reading; None: all kept): the worst load, steal and others' share, and the busy flag."""
    with _lock:
        blocks = [b for b in _blocks if since is None or b["at"] >= since]
    out = state()
    if not blocks:
        return out
    loads = [b["loadavg"] for b in blocks if b.get("loadavg")]
    worst_load = max(loads, key=lambda x: x[0]) if loads else out["loadavg"]

    def peak(key):
        vals = [b[key] for b in blocks if b.get(key) is not None]
        return max(vals) if vals else None

    others, steal = peak("others_cpu_pct"), peak("steal_pct")
    b = busy(worst_load, out["cores"], others)
    out.update(loadavg=worst_load, others_cpu_pct=others, steal_pct=steal, busy=b, advice=ADVICE if b else None,
               blocks=len(blocks), timed_s=round(sum(x["seconds"] for x in blocks), 3))
    return out


def now() -> float:
    """A reading of the clock :func:`during` compares with (take it when a stage starts)."""
    return _readers.clock()


def describe(m: dict | None) -> str:
    """One line for reports: "load 5.2/4.8/4.1 on 2 cores, others 63% of the CPUs, steal 0%: BUSY ..."."""
    if not m:
        return ""
    load = m.get("loadavg")
    cores = m.get("cores") or m.get("cpus_usable")  # bench's machine record names it so
    parts = [f"load {'/'.join(f'{x:g}' for x in load)} on {cores} cores" if load else f"{cores} cores"]
    if m.get("others_cpu_pct") is not None:
        parts.append(f"other processes {m['others_cpu_pct']:g}% of the CPUs while timing")
    if m.get("steal_pct") is not None:
        parts.append(f"steal {m['steal_pct']:g}%")
    cpu = m.get("cpu_model")
    tail = f" ({cpu}{', ' + '/'.join(m['isa']) if m.get('isa') else ''}" + (
        f", governor {m['governor']}" if m.get("governor") else "") + ")" if cpu else ""
    line = ", ".join(parts) + tail
    return (f"BUSY: {line}. {m['advice']}" if m.get("busy") else line)
