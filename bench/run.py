"""``make bench``: measure retool's speed and memory; write one JSON result file and print a table.

    .venv/bin/python bench/run.py --out bench/results            # full run (~20 min on 2 cores)
    .venv/bin/python bench/run.py --out /tmp/b --quick           # plumbing check (~4 min)
    .venv/bin/python bench/run.py --sections models --models torch-cnn --targets cpu,cpu-int8

A section whose retool part is missing (not built yet, extra not installed) is
recorded as skipped with its reason; nothing here lets one failure stop the run.
See docs/benchmarks.md for what every figure means.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import sections  # noqa: E402
from bench.machine import machine_info, section_machine, section_start, short_description  # noqa: E402
from bench.models import MODELS  # noqa: E402
from bench.report import render  # noqa: E402

RESULT_SCHEMA = 1
ALL_TARGETS = ("cpu", "cpu-int8", "cpu-int8-dynamic", "arm64-int8", "gpu-fp16", "tensorrt-int8", "npu-uint8", "cpu-auto")
SECTIONS = ("cold_start", "models", "large_model", "pipeline", "serving", "plan", "peers", "decoder", "decisions",
            "signing")


def settings_for(args) -> dict:
    quick = args.quick
    threads = args.threads or min(4, len(os.sched_getaffinity(0)))
    return {
        "quick": quick,
        "threads": threads,
        "batches": [1, 8],
        "cold_start_repeats": 3 if quick else 20,
        "convert_repeats": 1 if quick else 5,
        "latency_budget_s": 0.5 if quick else 5.0,
        "latency_min_rounds": 3 if quick else 10,
        "latency_warmup": 1 if quick else 3,
        "pipeline_repeats": 1 if quick else 5,
        "parity_scale": 0.25 if quick else 1.0,
        "large_mlp": "2048x8" if quick else None,  # None: bench.models.LARGE_WIDTH x LARGE_DEPTH
        "signing_repeats": 1 if quick else 5,
        "targets": list(args.targets.split(",")) if args.targets else list(ALL_TARGETS),
        "models": list(args.models.split(",")) if args.models else [m.name for m in MODELS],
    }


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def write_result(result: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the result JSON")
    ap.add_argument("--quick", action="store_true", help="few repeats, small large-model: checks the plumbing, "
                    "not figures to publish")
    ap.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--models", help=f"comma-separated subset of {','.join(m.name for m in MODELS)}")
    ap.add_argument("--targets", help=f"comma-separated subset of {','.join(ALL_TARGETS)}")
    ap.add_argument("--threads", type=int, help="intra-op threads for every latency figure (default: usable cores, max 4)")
    ap.add_argument("--work-dir", help="where models are written (default: a temp dir, deleted at the end); "
                    "the large model needs ~8 GB free there")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args(argv)

    chosen = args.sections.split(",") if args.sections else list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    settings = settings_for(args)
    bad = [m for m in settings["models"] if m not in {b.name for b in MODELS}]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {', '.join(b.name for b in MODELS)}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{_stamp()}{'-quick' if args.quick else ''}.json"
    machine = machine_info(ROOT, gemm_threads=1)  # with the GEMM limit every ratio is read against
    result = {"schema_version": RESULT_SCHEMA, "kind": "retool-bench", "started_at": _stamp(), "finished_at": None,
              "complete": False, "wall_s": None, "machine": machine, "settings": settings, "sections": {}}
    print(f"retool bench ({'quick' if args.quick else 'full'}) on {short_description(machine)}", flush=True)
    print(f"writing {path}", flush=True)

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="retool-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        for name in chosen:
            t0 = time.perf_counter()
            load0, watch = os.getloadavg()[0], section_start()
            print(f"\n== {name}", flush=True)
            try:
                data = getattr(sections, name)(settings, work / name)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # a bug in the harness still leaves the other sections' figures
                data = {"status": "error", "reason": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc()[-3000:]}
            data.setdefault("status", "ok")
            data["section_wall_s"] = round(time.perf_counter() - t0, 2)
            # 1-minute load average before and after: a busy machine explains noisy figures.
            data["loadavg_1m"] = {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)}
            data["machine"] = section_machine(machine, watch)  # CPU, load, steal, others' share, busy
            result["sections"][name] = data
            write_result(result, path)
            print(render(name, data), flush=True)
            print(f"({name}: {data['section_wall_s']:.0f} s)", flush=True)
    finally:
        result["wall_s"] = round(time.perf_counter() - t_start, 2)
        result["finished_at"] = _stamp()
        result["complete"] = len(result["sections"]) == len(chosen)
        write_result(result, path)
        if args.keep or args.work_dir:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {path} in {result['wall_s']:.0f} s")
    prev = sorted(p for p in out_dir.glob("bench-*.json") if p != path and p.name.endswith("-quick.json") == args.quick)
    if prev:
        print(f"compare with the previous run: {os.path.relpath(sys.executable)} bench/compare.py {prev[-1]} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
