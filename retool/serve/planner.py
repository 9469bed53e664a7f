"""Running a serving plan: a local Triton pinned to one replica's cores, every candidate measured with
perf_analyzer (see retool.serve.plan for what is measured and how the choice is made)."""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from retool import console
from retool.procs import temp_dir
from retool.serve import choice, loadtest as lt
from retool.serve.choice import keeps_up, rate_window_ms
from retool.serve.session import published_config
from retool.serve.plan import RATE_STEPS, Candidate, PlanInputs, build, choose, configs_for, family, probe_rate, server_rss


# ---- measuring -------------------------------------------------------------------------------------------------
def measure(sess, repo, cand: Candidate, inp: PlanInputs, data_file) -> None:
    """Fill in the candidate's probe, its Poisson points and its sustainable-rate bracket."""
    from retool.errors import RetoolError
    from retool.serve.tune import override

    v = cand.variant
    base = published_config(repo, v.model)
    try:
        sess.load(v.model, override(base, cand.config, v.max_batch_size))
        conc = [1, max(2, 2 * cand.config.instance_count)]
        cand.probe = lt.sweep(v.model, sess.grpc_url, concurrency=conc, input_data=data_file,
                              window_ms=inp.window_ms, stop=lambda p: choice.over_budget(p, inp.budget_p99_ms),
                              version=v.version)
        if choice.over_budget(cand.probe[0], inp.budget_p99_ms):  # with one request in flight: no rate helps
            cand.over_ms = cand.probe[0].p99_ms - inp.budget_p99_ms
            return
        capacity = max(p.throughput for p in cand.probe)
        failed_at, ceiling = capacity, capacity
        for f in RATE_STEPS:
            rate = round(min(capacity * f, ceiling), 1)
            if rate <= 0 or (cand.points and rate >= cand.points[-1].load):
                continue
            win = rate_window_ms(rate, inp.window_ms)

            def at_rate(rate=rate, win=win):
                return lt.run_point(v.model, sess.grpc_url, rate=rate, input_data=data_file, window_ms=win,
                                    version=v.version, distribution="poisson")
            p = at_rate()
            cand.points.append(p)
            if keeps_up(p, rate, win):
                d, _, more = choice.judge(p, inp.budget_p99_ms, at_rate)
                cand.points.extend(more)
                if d.passed:
                    cand.sustainable, cand.budget_decision = (rate, failed_at), d
                    return
                if d.undecided:
                    cand.undecided.append(d)
            failed_at = rate
            if not keeps_up(p, rate, win):  # overloaded: go below what it did sustain
                ceiling = 0.9 * p.throughput
        best = min(cand.points or cand.probe, key=lambda p: p.p99_ms)  # Poisson bursts queue: over at every rate
        cand.over_ms = best.p99_ms - inp.budget_p99_ms
    except RetoolError as exc:  # a configuration Triton refuses is a rejected candidate, not the end
        cand.error = str(exc)


def measure_at(sess, repo, cand: Candidate, rate: float, inp: PlanInputs, data_file, runs: int = 1) -> list:
    from retool.serve.tune import override

    v = cand.variant
    sess.load(v.model, override(published_config(repo, v.model), cand.config, v.max_batch_size))
    return [lt.run_point(v.model, sess.grpc_url, rate=rate, input_data=data_file,
                         window_ms=rate_window_ms(rate, inp.window_ms), version=v.version, distribution="poisson")
            for _ in range(runs)]


# ---- running it --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _replica_session(repo_url: str, cores: int):
    """A local Triton pinned to ``cores`` cores, so one replica is measured at its own size: the server
    inherits the CPU affinity retool has while it forks it."""
    from retool.serve.session import open_session

    saved = os.sched_getaffinity(0)
    with contextlib.ExitStack() as stack:
        os.sched_setaffinity(0, set(sorted(saved)[:cores]))
        try:
            sess = stack.enter_context(open_session(repo_url))
        finally:
            os.sched_setaffinity(0, saved)
        yield sess


def run(repo_url: str, name: str, inp: PlanInputs, *, confirm_runs: int = 3) -> dict:
    """Measure every candidate of ``name``'s family and return the plan (JSON-ready)."""
    from pathlib import Path

    from retool.publish import open_repo
    from retool.serve import samples as smp

    from retool import machine as mach

    t0 = time.perf_counter()
    machine = mach.state()  # before the server and the load generator, which are busy by design
    repo = open_repo(repo_url)
    variants, dups = family(repo, name)
    todo = [v for v in variants if v.readiness_passed is not False]
    cands = [Candidate(v, c, cores=inp.cores_per_replica) for v in todo for c in configs_for(v, inp)]
    with temp_dir("plan") as tmp, _replica_session(repo_url, inp.cores_per_replica) as sess:
        data: dict[str, Any] = {}
        for v in todo:
            man = repo.manifest(v.model, v.version)
            f = (man.get("samples") or {}).get("file")
            if f:
                ins = smp.load(repo.storage.read_bytes(f"{v.model}/{v.version}/{f}"))["in"]
                d = Path(tmp) / v.model
                d.mkdir()
                data[v.model] = lt.input_data_file(ins, d, batched=v.max_batch_size > 0)
        for i, c in enumerate(cands, 1):
            with console.step(f"{c.variant.model}: plan {i}/{len(cands)}: {c.config.label_for(inp.cores_per_replica)}"):
                measure(sess, repo, c, inp, data.get(c.variant.model))
        if inp.profile == "realtime":  # each at the load it would carry in its own deployment
            for c in (c for c in cands if c.sustainable):
                with console.step(f"{c.variant.model}: p99 at {probe_rate(c, inp):g} req/s: {c.config.label}"):
                    c.at_planned = measure_at(sess, repo, c, probe_rate(c, inp), inp, data.get(c.variant.model))[0]
        ranked, notes = choose(cands, inp)
        confirm = []
        if ranked:
            ch = ranked[0]
            with console.step(f"{ch.variant.model}: confirming {ch.config.label} at {probe_rate(ch, inp):g} req/s "
                              f"({confirm_runs} runs)"):
                confirm = measure_at(sess, repo, ch, probe_rate(ch, inp), inp, data.get(ch.variant.model),
                                     runs=confirm_runs)
        peak = server_rss(sess, ranked[0].variant.model if ranked else None)
        note = sess.backend_note
    return build(repo_url, name, variants, dups, cands, ranked, notes, confirm, inp, peak, time.perf_counter() - t0,
                 note, machine)
