"""Pick the serving configuration for a latency budget, by measuring each one in a real Triton.

The space: instances x ORT intra-op threads (their product at most the cores), and dynamic
batching off or on with a few queue delays and preferred batch sizes. Each configuration is
loaded through the load API's config override (the repository is not touched) and swept with
perf_analyzer. Kept: the highest throughput whose p99 meets the budget; at a fixed --rate, the
lowest p99 among those that sustain the rate. "Meets" and "better than the published configuration"
are judged on intervals (retool.serve.choice); a point within the noise of the budget does not meet it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from retool import console
from retool.procs import temp_dir
from retool.serve import choice, loadtest as lt
from retool.serve.profile import ServingConfig

#: the space's first point when nothing is published: 1 instance, ORT's threads, no batching. Once a
#: model is published, its own configuration (from_config of its config.pbtxt) is "the default".
DEFAULT = ServingConfig(1, None, False)
SPACES = ("small", "quick", "full")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def instance_thread_pairs(n_cores: int) -> list[tuple[int, int]]:
    pairs = {(1, 1), (1, n_cores)}
    for i in (2, 4, 8):
        if i <= n_cores:
            pairs.add((i, max(1, n_cores // i)))
    return sorted(pairs, key=lambda p: (p[0], p[1]))


def space(name: str, max_batch_size: int, n_cores: int, default: ServingConfig = DEFAULT) -> list[ServingConfig]:
    """The configurations to measure, ``default`` (what is published) first."""
    pairs = instance_thread_pairs(n_cores)
    batching = max_batch_size > 1
    out = [default]
    if name == "small":  # the default against one batching guess: for demos
        out.append(ServingConfig(1, n_cores, True, 500) if batching else ServingConfig(1, n_cores, False))
    elif name == "quick":
        i_max = max(p[0] for p in pairs)
        out.append(ServingConfig(1, n_cores, False))
        if batching:
            out.append(ServingConfig(1, n_cores, True, 500))
            out.append(ServingConfig(i_max, max(1, n_cores // i_max), True, 500))
        else:
            out.append(ServingConfig(i_max, max(1, n_cores // i_max), False))
    else:
        for i, t in pairs:
            out.append(ServingConfig(i, t, False))
            if batching:
                out.append(ServingConfig(i, t, True, 1000))
        if batching:
            half = max(2, max_batch_size // 2)
            for i, t in pairs:
                for delay, pref in ((100, ()), (4000, ()), (1000, (half,)), (1000, (max_batch_size,))):
                    out.append(ServingConfig(i, t, True, delay, pref))
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def from_config(base: dict) -> ServingConfig:
    """The ServingConfig a published config (as JSON) amounts to."""
    groups = base.get("instance_group") or [{}]
    thr = ((base.get("parameters") or {}).get("intra_op_thread_count") or {}).get("string_value")
    db = base.get("dynamic_batching")
    return ServingConfig(int(groups[0].get("count") or 1), int(thr) if thr else None, db is not None,
                         int((db or {}).get("max_queue_delay_microseconds") or 0),
                         tuple(int(b) for b in (db or {}).get("preferred_batch_size") or ()))


def override(base: dict, cfg: ServingConfig, max_batch_size: int) -> dict:
    """The published config (as JSON) with this configuration's instances, threads and batching."""
    out = {k: v for k, v in base.items() if k not in ("dynamic_batching",)}
    kinds = [g.get("kind") for g in base.get("instance_group", []) if g.get("kind")]
    kind = kinds[0] if kinds and kinds[0] != "KIND_AUTO" else "KIND_CPU"
    out["instance_group"] = [{"count": cfg.instance_count, "kind": kind}]
    params = {k: v for k, v in (base.get("parameters") or {}).items()
              if k not in ("intra_op_thread_count", "inter_op_thread_count")}
    if cfg.intra_op_thread_count:
        params["intra_op_thread_count"] = {"string_value": str(cfg.intra_op_thread_count)}
        params["inter_op_thread_count"] = {"string_value": "1"}
    out["parameters"] = params
    if cfg.dynamic_batching and max_batch_size > 1:
        db: dict[str, Any] = {"max_queue_delay_microseconds": str(cfg.max_queue_delay_microseconds)}
        if cfg.preferred_batch_size:
            db["preferred_batch_size"] = [b for b in cfg.preferred_batch_size if b <= max_batch_size]
        out["dynamic_batching"] = db
    return out


@dataclass
class Measured:
    config: ServingConfig
    points: list = field(default_factory=list)
    best: Any = None  # the LoadPoint kept for this configuration
    #: the kept point against the budget (retool.speed.Decision), and the points judged within the noise
    decision: Any = None
    undecided: list = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        return {"label": self.config.label, "config": self.config.to_dict(), "error": self.error,
                "points": [p.to_dict() for p in self.points], "best": self.best.to_dict() if self.best else None,
                "budget_decision": self.decision.to_dict() if self.decision else None,
                "undecided": [d.to_dict() for d in self.undecided]}


def pick(m: Measured, spec: lt.LoadSpec, again=None) -> None:
    """The point kept for one configuration: at a fixed rate, the lowest p99 among the points that keep
    up and meet the budget; else the highest throughput that meets it (any point without a budget).
    "Meets" is the decision rule's (retool.serve.choice); ``again(point)`` measures a point once more
    while it is within the noise of the budget."""
    budget = spec.budget_p99_ms
    m.best = m.decision = None
    if budget is None:
        if spec.rate:
            ok = [p for p in m.points if choice.keeps_up(p, spec.rate, spec.window_ms)]
            m.best = min(ok, key=lambda p: p.p99_ms) if ok else None
        else:
            m.best = max(m.points, key=lambda p: p.throughput) if m.points else None
        return
    order = (sorted(m.points, key=lambda p: p.p99_ms) if spec.rate
             else sorted(m.points, key=lambda p: -p.throughput))
    for p in order:
        if spec.rate and not choice.keeps_up(p, spec.rate, spec.window_ms):
            continue
        d, rep, more = choice.judge(p, budget, (lambda p=p: again(p)) if again else None)
        m.points.extend(more)  # the runs measured again are measurements too (the table shows them)
        if d.passed:
            m.best, m.decision = rep, d
            return
        if d.undecided:
            m.undecided.append(d)


def tune(sess, repo, name: str, spec: lt.LoadSpec, *, configs: "Sequence[ServingConfig] | str | None" = None) -> dict:
    """Measure each configuration; returns the report (JSON-ready). ``configs`` replaces the space
    ("published": only the configuration in the repository, loaded as it is)."""
    from retool.serve import samples as smp
    from retool.serve.session import published_config

    versions = repo.versions(name)
    v = versions[-1]
    base = published_config(repo, name)
    mbs = int(base.get("max_batch_size") or 0)
    n_cores = cores()
    published = from_config(base)
    if configs == "published":  # measure what is published, as it is
        todo = [published]
    else:
        todo = list(configs) if configs else space(spec.space, mbs, n_cores, published)
    man = repo.manifest(name, v)
    from pathlib import Path

    measured: list[Measured] = []
    failed: list = []  # the RetoolError of each configuration that could not be measured
    t0 = time.perf_counter()
    with temp_dir("load") as tmp:
        data_file = None
        if (man.get("samples") or {}).get("file"):
            data = smp.read_published(repo, name, v, man["samples"])
            data_file = lt.input_data_file(data["in"], Path(tmp), batched=mbs > 0)

        def again(p):
            return lt.run_point(name, sess.grpc_url, concurrency=int(p.load) if p.mode == "concurrency" else None,
                                rate=p.load if p.mode == "rate" else None, input_data=data_file,
                                window_ms=spec.window_ms)
        try:
            took: list[float] = []  # each configuration's time: the next one's estimate on a terminal's bar
            for cfg in todo:
                m = Measured(cfg)
                measured.append(m)
                t_cfg = time.perf_counter()
                with console.step(f"{name}: {cfg.label} ({len(measured)}/{len(todo)})",
                                  estimate_s=sum(took) / len(took) if took else None):
                    try:
                        sess.load(name, None if configs == "published" else override(base, cfg, mbs),
                                  timeout=spec.timeout)
                        stop = None if spec.rate or spec.rates else (lambda p: choice.over_budget(p, spec.budget_p99_ms))
                        m.points = lt.sweep(name, sess.grpc_url, concurrency=spec.concurrency,
                                            rates=spec.sweep_rates(), input_data=data_file, window_ms=spec.window_ms,
                                            stop=stop)
                        pick(m, spec, again)  # may measure a point again: the configuration is still loaded
                    except Exception as exc:  # one configuration that fails is reported, not fatal
                        from retool.errors import RetoolError

                        if not isinstance(exc, RetoolError):
                            raise
                        m.error = str(exc)
                        failed.append(exc)
                took.append(time.perf_counter() - t_cfg)
            if failed and len(failed) == len(measured):
                raise nothing_measured(name, failed)

            def confirm(challenger: Measured, default: Measured):
                return _confirm(sess, name, spec, data_file, challenger, default, base, mbs)

            # inside the try: the confirmation loads configurations too, and an existing server gets its
            # published one back after it
            return report(name, v, measured, spec, n_cores, time.perf_counter() - t0, sess.backend_note,
                          published, confirm=confirm)
        finally:
            if sess.server is None:  # an existing server goes back to the published config
                try:
                    sess.load(name, timeout=spec.timeout)
                except Exception:  # noqa: BLE001 - best effort on someone else's server
                    console.warn(f"could not reload {name} with its published config on {sess.http_url}")


def _confirm(sess, name, spec, data_file, challenger: Measured, default: Measured, base, mbs):
    """Measure the published configuration and the challenger in alternation, at the challenger's kept
    point's load, and decide on the paired rounds (retool.serve.choice.confirmed)."""
    p = challenger.best
    runs: dict[str, list] = {"published": [], "challenger": []}
    with console.step(f"{name}: {challenger.config.label} beat the published {default.config.label}: "
                      f"confirming over {choice.CONFIRM_ROUNDS} alternating rounds"):
        try:
            for _ in range(choice.CONFIRM_ROUNDS):
                for key, m in (("published", default), ("challenger", challenger)):
                    sess.load(name, override(base, m.config, mbs), timeout=spec.timeout)
                    runs[key].append(lt.run_point(
                        name, sess.grpc_url, concurrency=int(p.load) if p.mode == "concurrency" else None,
                        rate=p.load if p.mode == "rate" else None, input_data=data_file, window_ms=spec.window_ms))
        except Exception as exc:  # noqa: BLE001 - a round that cannot be measured keeps the published one
            from retool.errors import RetoolError
            from retool.speed import decide

            if not isinstance(exc, RetoolError):
                raise
            nan = float("nan")
            return decide(nan, nan, nan, 1.0, rule=f"the confirmation could not be measured ({exc}): the "
                                                   f"published configuration stays")
    return choice.confirmed(runs["published"], runs["challenger"], "p99_ms" if spec.rate else "throughput")


def nothing_measured(name: str, errors: list):
    """Every configuration failed: its error (7 when Triton refused the model, else 8/9 ...), with the count."""
    from retool.errors import ModelLoadError

    err = next((e for e in errors if isinstance(e, ModelLoadError)), errors[0])
    n = len(errors)
    err.message = (f"{name}: nothing measured ({n} of {n} configuration{'s' if n > 1 else ''} failed): "
                   f"{err.message}")
    return err


def report(name, version, measured: list[Measured], spec: lt.LoadSpec, n_cores: int, seconds: float, note: str,
           published: ServingConfig = DEFAULT, confirm=None) -> dict:
    rate = spec.rate
    default = next((m for m in measured if m.config == published), None)
    chosen, decision, challenger = choice.configuration(measured, default, "p99_ms" if rate else "throughput",
                                                        confirm)
    out: dict[str, Any] = {
        "model": name, "version": version, "budget_p99_ms": spec.budget_p99_ms, "rate": rate, "cores": n_cores,
        "window_ms": spec.window_ms, "seconds": round(seconds, 1), "server": note, "spec": spec.to_dict(),
        "configs": [m.to_dict() for m in measured], "chosen": None, "met": chosen is not None,
        "published": published.to_dict(), "decision": decision.to_dict() if decision else None,
        "kept_published": chosen is default and decision is not None,
        "challenger": challenger.config.label if challenger is not None else None,
        "undecided": sum(len(m.undecided) for m in measured),
    }
    if chosen is not None:
        b = chosen.best
        out["chosen"] = {"label": chosen.config.label, "config": chosen.config.to_dict(), "point": b.to_dict(),
                         "cost_per_million": lt.cost_per_million(spec.price_per_hour, b.throughput),
                         "budget_decision": chosen.decision.to_dict() if chosen.decision else None}
        if default is not None and default.best is not None and not rate:
            out["chosen"]["throughput_vs_default"] = b.throughput / default.best.throughput
        if default is not None:
            out["default"] = {"label": default.config.label,
                              "point": default.best.to_dict() if default.best else None}
    else:
        pts = [(m, p) for m in measured for p in m.points]
        if pts:
            m, p = min(pts, key=lambda mp: mp[1].p99_ms)
            budget = spec.budget_p99_ms
            out["closest"] = {"label": m.config.label, "point": p.to_dict(),
                              "over_budget_ms": (p.p99_ms - budget) if budget is not None else None,
                              "within_noise": bool(m.undecided)}
    if spec.price_per_hour:
        out["cost_per_hour"] = spec.price_per_hour
        out["currency"] = spec.currency
    return out


def measurement(rep: dict) -> dict:
    """What a serving profile (and so the manifest) records about the choice."""
    ch = rep["chosen"]
    p = ch["point"]
    return {"budget_p99_ms": rep["budget_p99_ms"], "rate": rep["rate"], "throughput": p["throughput"],
            "p50_ms": p["p50_ms"], "p99_ms": p["p99_ms"], "queue_ms": p["queue_ms"], "compute_ms": p["compute_ms"],
            "load": {"mode": p["mode"], "value": p["load"]}, "throughput_vs_default": ch.get("throughput_vs_default"),
            "cost_per_million": ch.get("cost_per_million"), "cores": rep["cores"], "window_ms": rep["window_ms"],
            "server": rep["server"], "configs_measured": len(rep["configs"])}


def verdict(rep: dict) -> str:
    """One line: the chosen configuration and its numbers, or by how much the budget is missed."""
    budget, ch = rep.get("budget_p99_ms"), rep.get("chosen")
    if ch:
        p = ch["point"]
        at = f"at {p['mode']} {p['load']:g}"
        txt = (f"{rep['model']}: {ch['label']}: {p['throughput']:.0f} infer/s, p99 {p['p99_ms']:.2f} ms {at}"
               + (f" (budget p99 <= {budget:g} ms)" if budget is not None else "")
               + ("" if p.get("stable", True) else " [unstable windows: a busy machine]"))
        dec = rep.get("decision")
        if dec and rep.get("kept_published"):
            txt += (f"; kept the published configuration: {rep.get('challenger')} is not better beyond the noise "
                    f"({dec['text']})")
        elif dec:
            txt += f"; better than the published configuration beyond the noise ({dec['text']})"
        elif budget is not None and rep.get("default") and not (rep["default"] or {}).get("point"):
            txt += "; the default configuration does not meet the budget"
        if ch.get("cost_per_million") is not None:
            cur = rep.get("currency") or "USD"
            txt += f"; {ch['cost_per_million']:.4g} {cur} per million inferences at {rep.get('cost_per_hour'):g} {cur}/h"
        return txt
    c = rep.get("closest")
    if not c:
        return f"{rep['model']}: no configuration could be measured (see the report's errors)"
    p = c["point"]
    over = f", {c['over_budget_ms']:.2f} ms over" if c.get("over_budget_ms") is not None else ""
    if c.get("within_noise") and (c.get("over_budget_ms") or 0) <= 0:
        over = (": within the noise of the budget even after measuring again (undecided, planned as a miss); "
                "rerun on a quieter machine or with a longer --window-ms")
    at = f" at {rep['rate']:g} req/s" if rep.get("rate") else ""
    return (f"{rep['model']}: no configuration meets p99 <= {budget:g} ms{at}: the closest, {c['label']}, has p99 "
            f"{p['p99_ms']:.2f} ms at {p['mode']} {p['load']:g}{over}")
