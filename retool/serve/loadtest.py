"""Load tests with Triton's own perf_analyzer: one point per concurrency (or request rate).

Each point records throughput, client p50/p90/p99 and the server's split into queue and compute
(perf_analyzer reads it from Triton's statistics). The requests carry the version's held-out
samples (perf_analyzer's --input-data), so integer inputs stay in range.
"""
from __future__ import annotations

import base64
import csv
import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from retool.errors import ServingError
from retool.procs import die_with_parent, temp_dir
from retool.serve.home import perf_analyzer, perf_env

#: a window long enough for a few hundred requests on a small CPU model, short enough to sweep
DEFAULT_WINDOW_MS = 1500
STABILITY_PCT = 25
LOOSE_STABILITY_PCT = 80
ANY_PCT = 100000  # accept whatever three windows say (the point is marked unstable)
MAX_TRIALS = 5
#: perf_analyzer's "use a larger time window": the window grows 4x per try, up to MAX_WINDOW_MS
MAX_WINDOW_MS = 10_000


@dataclass(frozen=True)
class LoadPoint:
    mode: str  # concurrency | rate
    load: float  # the concurrency, or the request rate asked for (req/s)
    throughput: float  # inferences/s
    p50_ms: float
    p90_ms: float
    p99_ms: float
    queue_ms: float
    compute_ms: float  # compute input + infer + output on the server
    server_ms: float  # queue + compute
    #: three windows agreed within STABILITY_PCT; False: they did not (a busy machine), read with care
    stable: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LoadSpec:
    """What one load test asks, given once and passed down whole: the budget, the load to offer, how long
    each window is, the configurations to try and the price."""

    budget_p99_ms: float | None = None
    #: with a budget: the one rate the budget must hold at (the lowest p99 there wins)
    rate: float | None = None
    #: without a budget: a request-rate sweep instead of the concurrency sweep
    rates: tuple[float, ...] = ()
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    window_ms: int = DEFAULT_WINDOW_MS
    space: str = "quick"
    price_per_hour: float | None = None
    currency: str = "USD"
    #: seconds for a model (configuration) to load
    timeout: float = 120.0

    def sweep_rates(self) -> list[float]:
        return list(self.rates) or ([self.rate] if self.rate else [])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rates"], d["concurrency"] = list(self.rates), list(self.concurrency)
        return d


def input_data_file(samples_in: Mapping[str, np.ndarray], folder: Path, batched: bool) -> Path:
    """perf_analyzer's --input-data JSON: one entry per sample row (b64, exact)."""
    rows = next(iter(samples_in.values())).shape[0] if batched else 1
    data = []
    for r in range(rows):
        entry = {}
        for k, a in samples_in.items():
            x = np.ascontiguousarray(a[r] if batched else a)
            entry[k] = {"b64": base64.b64encode(x.tobytes()).decode(), "shape": list(x.shape)}
        data.append(entry)
    p = folder / "input-data.json"
    p.write_text(json.dumps({"data": data}))
    return p


def _us(row: Mapping, key: str) -> float:
    try:
        return float(row.get(key) or 0) / 1000.0
    except ValueError:
        return 0.0


def parse_csv(path: Path, mode: str) -> list[LoadPoint]:
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            load_key = "Concurrency" if mode == "concurrency" else "Request Rate"
            queue = _us(row, "Server Queue")
            compute = sum(_us(row, k) for k in ("Server Compute Input", "Server Compute Infer",
                                                 "Server Compute Output"))
            out.append(LoadPoint(mode, float(row.get(load_key) or 0), float(row["Inferences/Second"]),
                                 _us(row, "p50 latency"), _us(row, "p90 latency"), _us(row, "p99 latency"),
                                 queue, compute, queue + compute))
    return out


def run_point(model: str, grpc_url: str, *, concurrency: int | None = None, rate: float | None = None,
              input_data: Path | None = None, window_ms: int = DEFAULT_WINDOW_MS, timeout: float = 180.0,
              version: int | None = None, distribution: str = "constant") -> LoadPoint:
    """One perf_analyzer measurement over gRPC. When the windows disagree (a busy machine) it is
    measured again with a looser stability bound and marked unstable, rather than dropped. When it records
    no request in a window (one outlasts it), the window grows, as perf_analyzer advises.
    ``distribution`` (rate mode): "constant" intervals, or "poisson" arrivals as real traffic has."""
    while True:
        try:
            return _run_point(model, grpc_url, concurrency, rate, input_data, window_ms, timeout, version,
                              STABILITY_PCT, distribution)
        except _Unstable:
            break
        except _WindowTooShort:  # a request (or the first after loading) outlasts the window: as it advises
            window_ms = min(4 * int(window_ms), MAX_WINDOW_MS)  # at the cap it raises a plain ServingError
    try:
        p = _run_point(model, grpc_url, concurrency, rate, input_data, window_ms, timeout, version,
                       LOOSE_STABILITY_PCT, distribution)
    except _Unstable:
        # a machine this busy gives no stable windows at all: take three windows as they come, flagged
        p = _run_point(model, grpc_url, concurrency, rate, input_data, window_ms, timeout, version, ANY_PCT,
                       distribution)
    return LoadPoint(**{**p.to_dict(), "stable": False})


class _Unstable(Exception):
    pass


class _WindowTooShort(ServingError):
    """perf_analyzer recorded no request in a window (run_point widens it; escapes only from the looser retries)."""


def _run_point(model, grpc_url, concurrency, rate, input_data, window_ms, timeout, version, stability,
               distribution="constant") -> LoadPoint:
    mode = "rate" if rate else "concurrency"
    with temp_dir("pa") as tmp:
        csv_path = Path(tmp) / "pa.csv"
        cmd = [str(perf_analyzer()), "-m", model, "-u", grpc_url, "-i", "grpc", "-b", "1",
               "--measurement-interval", str(int(window_ms)), "--stability-percentage", str(stability),
               "--max-trials", str(MAX_TRIALS), "-f", str(csv_path)]
        if version:
            cmd += ["-x", str(version)]
        if input_data:
            cmd += ["--input-data", str(input_data)]
        if rate:
            cmd += ["--request-rate-range", f"{float(rate):g}", "--request-distribution", distribution]
        else:
            cmd += ["--concurrency-range", str(int(concurrency or 1))]
        try:
            # dies with retool: a kill -9 must not leave it loading a server
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=perf_env(),
                                  preexec_fn=die_with_parent())
        except subprocess.TimeoutExpired:
            raise ServingError(f"perf_analyzer on {model} ran past {timeout:.0f} s") from None
        if proc.returncode != 0 or not csv_path.exists():
            text = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            why = next((ln for ln in text if "error" in ln.lower() or "failed" in ln.lower()), text[-1] if text else "")
            said = (proc.stderr + proc.stdout).lower()
            if "larger time window" in said and window_ms < MAX_WINDOW_MS:
                raise _WindowTooShort(f"perf_analyzer on {model}: {why.strip()[:200]} (window {window_ms} ms)")
            if "stable" in said:
                raise _Unstable(why.strip()[:200])
            raise ServingError(f"perf_analyzer on {model} failed (exit {proc.returncode}): {why.strip()[:300]}")
        points = parse_csv(csv_path, mode)
    if not points:
        raise ServingError(f"perf_analyzer on {model} wrote no measurement")
    return points[-1]


def sweep(model: str, grpc_url: str, *, concurrency: Sequence[int] = (1, 2, 4, 8), rates: Sequence[float] = (),
          input_data: Path | None = None, window_ms: int = DEFAULT_WINDOW_MS,
          stop: Callable[[LoadPoint], bool] | None = None, version: int | None = None) -> list[LoadPoint]:
    """A concurrency sweep, or a request-rate sweep when ``rates`` is given. It stops after the first
    point for which ``stop`` says so (over the budget beyond the noise: more load only queues more)."""
    points = []
    loads = [("rate", r) for r in rates] if rates else [("concurrency", c) for c in concurrency]
    for kind, value in loads:
        p = run_point(model, grpc_url, concurrency=value if kind == "concurrency" else None,
                      rate=value if kind == "rate" else None, input_data=input_data, window_ms=window_ms,
                      version=version)
        points.append(p)
        if stop is not None and stop(p):
            break
    return points


def cost_per_million(cost_per_hour: float | None, throughput: float) -> float | None:
    if not cost_per_hour or throughput <= 0:
        return None
    return float(cost_per_hour) / (throughput * 3600.0) * 1e6
