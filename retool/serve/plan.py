"""The serving plan: from a latency budget and a peak rate to the cheapest deployment that meets them.

Candidates are every published variant of a model family (the models whose provenance names the same
source) times the configurations one replica of ``cores_per_replica`` cores can run. Each candidate's
**sustainable rate** is measured the way serving latency is defined, compute plus queue time under
Poisson arrivals at a fixed rate (perf_analyzer ``--request-rate-range``, ``--request-distribution
poisson``): a closed-loop probe estimates the capacity, then rates below it are tried, highest first,
until p99 meets the budget by the decision rule (retool.serve.choice: a p99 within the noise of the
budget is measured again, and still undecided counts as a miss). The rate that passed and the one
above it that did not bracket the sustainable rate, and that bracket is its interval.

    replicas = ceil(rate / (sustainable rate per replica x headroom))

The throughput profile takes the cheapest candidate (fewest replicas), then the highest sustainable
rate; the realtime profile takes the lowest p99 at each candidate's own planned per-replica rate, then
the cheapest. Comparisons go through retool.speed's decision rule: a difference inside the noise is a
tie, and a tie keeps the cheaper, then the configuration already published, the higher precision and
the fewer instances, so two plans on an unchanged repository choose the same. The choice is confirmed
by separate runs at its planned rate.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from retool.errors import UsageError
from retool.serve import choice
from retool.serve.profile import ServingConfig

PLAN_KIND = "retool-serving-plan"
PROFILES = ("realtime", "throughput")
HOURS_PER_MONTH = 730.0
#: rates tried below the closed-loop capacity, highest first
RATE_STEPS = (0.9, 0.7, 0.5, 0.3)
#: a point below this rate says little about p99 in a short window; the planned rate is probed at least here
MIN_PROBE_RATE = 50.0
_PRECISION_ORDER = {"fp32": 0, "mixed": 1, "fp16": 2, "int8": 3, "uint8": 3, "int4": 4}


@dataclass(frozen=True)
class PlanInputs:
    budget_p99_ms: float
    rate: float
    price_per_hour: float | None = None
    currency: str = "USD"
    cores_per_replica: int = 1
    headroom: float = 0.7
    profile: str = "realtime"
    window_ms: int = 1000
    space: str = "quick"

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Variant:
    """One published artifact of the family."""

    model: str
    version: int
    variant: str  # the target that made it (cpu, cpu-int8 ...), else its precision
    precision: str
    sha256: str
    model_bytes: int
    max_batch_size: int
    published: ServingConfig  # what its config.pbtxt serves now
    readiness_passed: bool | None

    def to_dict(self) -> dict:
        return {"model": self.model, "version": self.version, "variant": self.variant, "precision": self.precision,
                "sha256": self.sha256, "model_bytes": self.model_bytes, "max_batch_size": self.max_batch_size,
                "published_config": self.published.to_dict(), "readiness_passed": self.readiness_passed}


@dataclass
class Candidate:
    variant: Variant
    config: ServingConfig
    probe: list = field(default_factory=list)  # closed-loop LoadPoints
    points: list = field(default_factory=list)  # Poisson LoadPoints, highest rate first
    sustainable: tuple[float, float] | None = None  # bracket: passed, next failed (or capacity)
    at_planned: Any = None  # LoadPoint at the planned per-replica rate (realtime comparison)
    error: str | None = None
    over_ms: float | None = None  # when nothing met the budget: the best p99's excess
    cores: int | None = None  # of the replica: ORT's default thread count spelt out in labels
    #: the passing rate's p99 against the budget (retool.speed.Decision); rates judged within the noise
    budget_decision: Any = None
    undecided: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.variant.model} v{self.variant.version}: {self.config.label_for(self.cores)}"

    def replicas(self, inp: PlanInputs) -> int | None:
        if not self.sustainable:
            return None
        return max(1, math.ceil(inp.rate / (self.sustainable[0] * inp.headroom)))

    def to_dict(self, inp: PlanInputs) -> dict:
        return {"model": self.variant.model, "version": self.variant.version, "variant": self.variant.variant,
                "config": self.config.to_dict(), "label": self.config.label_for(inp.cores_per_replica),
                "key": self.label,
                "error": self.error,
                "sustainable_rate": _interval(self.sustainable), "replicas": self.replicas(inp),
                "over_budget_ms": self.over_ms, "probe": [p.to_dict() for p in self.probe],
                "points": [p.to_dict() for p in self.points],
                "at_planned_rate": self.at_planned.to_dict() if self.at_planned else None,
                "budget_decision": self.budget_decision.to_dict() if self.budget_decision else None,
                "undecided": [d.to_dict() for d in self.undecided]}


def _interval(br) -> dict | None:
    if not br:
        return None
    return {"value": _sig(br[0]), "interval": [_sig(br[0]), _sig(br[1])]}


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


# ---- the family ----------------------------------------------------------------------------------------------
def family(repo, name: str) -> tuple[list[Variant], list[dict]]:
    """Published variants that share ``name``'s source (provenance source_sha256), name's own first.
    Identical bytes under a second name are measured once and listed as duplicates."""
    from retool.serve.session import published_config
    from retool.serve.tune import from_config

    name = repo.require_model(name)
    if not repo.versions(name):
        raise UsageError(f"{repo.storage.location(name)}: {name!r} has no published version; publish it first")

    def latest(model: str):
        vs = repo.versions(model)
        return (vs[-1], repo.manifest(model, vs[-1])) if vs else (None, None)

    _, own = latest(name)
    source = _source_key(own)
    models = [name] + sorted(m for m in repo.models() if m != name)
    out: list[Variant] = []
    dup: list[dict] = []
    seen: dict[str, str] = {}
    for m in models:
        v, man = latest(m)
        if man is None or (m != name and (not source or _source_key(man) != source)):
            continue
        art = man.get("artifact") or {}
        sha = str(art.get("sha256") or (man.get("files") or {}).get("model.onnx", {}).get("sha256"))
        if sha in seen:
            dup.append({"model": m, "version": v, "reason": f"the same bytes as {seen[sha]}; measured once"})
            continue
        seen[sha] = m
        cfg = published_config(repo, m)
        size = sum(int(f.get("size", 0)) for f in (man.get("files") or {}).values())
        out.append(Variant(m, v, str(art.get("target") or art.get("precision") or "fp32"),
                           str(art.get("precision") or "fp32"), sha, size, int(cfg.get("max_batch_size") or 0),
                           from_config(cfg), (man.get("readiness") or {}).get("passed")))
    return out, dup


def _source_key(manifest: dict) -> str | None:
    """What makes variants one family: the source's sha256; for a source without one (a Python factory),
    the first step's output (the fp32 ONNX every target was made from)."""
    prov = manifest.get("provenance") or {}
    chain = prov.get("chain") or [{}]
    return prov.get("source_sha256") or chain[0].get("output_sha256") or None


def configs_for(variant: Variant, inp: PlanInputs) -> list[ServingConfig]:
    """The published configuration first, then the space a replica of this size can run. The realtime
    profile allows no batching delay above a tenth of the budget; the throughput profile tries more."""
    from retool.serve.tune import space

    todo = [variant.published] + space(inp.space, variant.max_batch_size, inp.cores_per_replica)
    if inp.profile == "throughput" and variant.max_batch_size > 1:
        delay = int(min(4000, inp.budget_p99_ms * 1000 / 4))
        todo += [ServingConfig(1, inp.cores_per_replica, True, delay, (variant.max_batch_size,))]
    cap_us = inp.budget_p99_ms * 1000 / 10
    out = []
    for c in todo:
        if (c.instance_count * (c.intra_op_thread_count or inp.cores_per_replica) > inp.cores_per_replica
                and c != variant.published):
            continue
        if inp.profile == "realtime" and c.dynamic_batching and c.max_queue_delay_microseconds > cap_us:
            c = replace(c, max_queue_delay_microseconds=int(cap_us), preferred_batch_size=())
        if c not in out:
            out.append(c)
    return out


# ---- measuring helpers --------------------------------------------------------------------------------------
def probe_rate(cand: Candidate, inp: PlanInputs) -> float:
    """The per-replica rate the plan puts on one replica, floored so a window holds enough requests."""
    n = cand.replicas(inp) or 1
    return round(min(cand.sustainable[0], max(inp.rate / n, MIN_PROBE_RATE)), 1)


# ---- choosing --------------------------------------------------------------------------------------------------
def _safe_order(c: Candidate) -> tuple:
    """Tie-break, safest first: the published configuration, higher precision, fewer instances, no batching."""
    return (c.config != c.variant.published, _PRECISION_ORDER.get(c.variant.precision, 5), c.config.instance_count,
            c.config.dynamic_batching, c.config.max_queue_delay_microseconds, c.variant.model)


def better(a: Candidate, b: Candidate, inp: PlanInputs):
    """The decision rule on a against b: pass (a is better beyond the noise), fail, or undecided."""
    from retool.speed import decide

    if inp.profile == "realtime" and a.at_planned is not None and b.at_planned is not None:
        return choice.compare(a.at_planned, b.at_planned, "p99_ms")
    (alo, ahi), (blo, bhi) = a.sustainable, b.sustainable
    return decide(alo / blo, alo / bhi, ahi / blo, 1.0, higher_is_better=True,
                  rule="sustainable rate: the bracket between the highest rate that met the budget and the next "
                       "that did not", samples=2, confidence=0.0)


def choose(cands: Sequence[Candidate], inp: PlanInputs) -> tuple[list[Candidate], list[dict]]:
    """Feasible candidates ranked best first, with the reason each ranks below the one above it.

    throughput: the fewest replicas, then the highest sustainable rate; realtime: the lowest p99 at
    the candidate's planned per-replica rate, then the fewest replicas. A candidate moves ahead only
    when the decision rule says it is better beyond the noise; otherwise the cheaper and safer stays."""
    from retool.speed import PASS

    feasible = [c for c in cands if c.sustainable]
    if not feasible:
        return [], []
    start = sorted(feasible, key=lambda c: (c.replicas(inp), _safe_order(c)))
    if inp.profile == "throughput":
        fewest = start[0].replicas(inp)
        contest, rest = [c for c in start if c.replicas(inp) == fewest], [c for c in start if c.replicas(inp) != fewest]
    else:
        contest, rest = [c for c in start if c.at_planned is not None], [c for c in start if c.at_planned is None]
    ranked: list[Candidate] = []
    for c in contest:
        pos = len(ranked)
        while pos > 0 and better(c, ranked[pos - 1], inp).outcome == PASS:
            pos -= 1
        ranked.insert(pos, c)
    what = "p99 at its planned per-replica rate" if inp.profile == "realtime" else "sustainable rate"
    notes = []
    for hi, lo in zip(ranked, ranked[1:]):
        d = better(hi, lo, inp)
        if d.outcome == PASS:
            why = f"{what} worse beyond the noise ({d.text})"
        else:
            why = (f"tied within noise on {what} ({d.text}); kept: the cheaper, then the safer (published "
                   f"configuration, higher precision, fewer instances)")
        notes.append({"model": lo.variant.model, "label": lo.label, "why": why})
    for c in rest:
        notes.append({"model": c.variant.model, "label": c.label,
                      "why": f"needs {c.replicas(inp)} replicas against {ranked[0].replicas(inp)}"})
    return ranked + rest, notes


# ---- the plan ---------------------------------------------------------------------------------------------------
def cost(inp: PlanInputs, replicas: int) -> dict | None:
    if inp.price_per_hour is None:
        return None
    per_hour = inp.price_per_hour * replicas
    return {"per_hour": per_hour, "per_month": per_hour * HOURS_PER_MONTH,
            "per_million": per_hour / (inp.rate * 3600.0) * 1e6, "currency": inp.currency}


def server_rss(sess, model: str | None = None) -> int | None:
    """Peak resident memory of the server and its stubs (VmHWM summed over the process tree). With
    ``model``, only its own stubs count: the plan loaded the whole family, a replica serves one model."""
    srv = getattr(sess, "server", None)
    if srv is None or not srv.pid:
        return None
    total, todo, seen = 0, [srv.pid], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        with contextlib.suppress(OSError, ValueError):
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            mine = pid == srv.pid or model is None or f"/{model}/" in cmd
            for line in open(f"/proc/{pid}/status") if mine else ():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
            for tid in os.listdir(f"/proc/{pid}/task"):
                todo += [int(x) for x in open(f"/proc/{pid}/task/{tid}/children").read().split()]
    return total or None


def memory_request(model_bytes: int, peak_rss: int | None) -> int:
    """Peak RSS measured here plus a quarter and 64 MiB, rounded up to 64 MiB; without a measurement,
    512 MiB plus four times the model (the Python backend keeps a session and its arena per instance)."""
    need = int(peak_rss * 1.25) + (64 << 20) if peak_rss else (512 << 20) + 4 * model_bytes
    return -(-need // (64 << 20)) * (64 << 20)


def build(repo_url: str, name: str, variants: list[Variant], dups: list[dict], cands: list[Candidate],
          ranked: list[Candidate], notes: list[dict], confirm: list, inp: PlanInputs, peak_rss, seconds: float,
          note: str, machine: dict | None = None) -> dict:
    out: dict[str, Any] = {
        "kind": PLAN_KIND, "version": 1, "repository": repo_url, "family": name, "inputs": inp.to_dict(),
        "variants": [v.to_dict() for v in variants], "duplicates": dups, "server": note, "seconds": round(seconds, 1),
        "machine": machine or {}, "candidates": [c.to_dict(inp) for c in cands], "chosen": None,
        "runner_up": None, "rejected": [], "met": bool(ranked),
        "rule": "cheapest (fewest replicas) first; then " + (
            "the lowest p99 at the planned per-replica rate" if inp.profile == "realtime" else
            "the highest sustainable rate") + "; differences inside the noise are ties, kept by the safe order"}
    for c in cands:
        if c.sustainable:
            continue
        if c.error:
            why = c.error
        elif c.undecided and c.over_ms is not None and c.over_ms <= 0:
            why = (f"p99 within the noise of the budget down to {c.points[-1].load:g} req/s, even measured "
                   f"{choice.REMEASURE + 1} times (undecided: counted as a miss; rerun on a quieter machine)")
        elif c.over_ms is not None and c.over_ms <= 0 and c.points:
            why = (f"fell behind the offered rate at every rate tried, down to {c.points[-1].load:g} req/s "
                   f"(completed {c.points[-1].throughput:.1f} req/s)")
        elif c.over_ms is not None and c.points:
            why = (f"over budget by {c.over_ms:.2f} ms at every rate tried, down to {c.points[-1].load:g} req/s "
                   f"(Poisson arrivals queue)")
        elif c.over_ms is not None:
            why = f"over budget by {c.over_ms:.2f} ms with one request in flight"
        else:
            why = "not measured"
        out["rejected"].append({"model": c.variant.model, "label": c.label, "reason": why})
    for v in variants:
        if v.readiness_passed is False:
            out["rejected"].append({"model": v.model, "label": f"{v.model} v{v.version}",
                                    "reason": "failed its readiness (accuracy) gate at publish; not measured"})
    if not ranked:
        worst = [c for c in cands if c.over_ms is not None and c.over_ms > 0]
        if worst:
            b = min(worst, key=lambda c: c.over_ms)
            out["closest"] = {"label": b.label, "over_budget_ms": round(b.over_ms, 3)}
        return out
    ch = ranked[0]
    n = ch.replicas(inp)
    lo_n = max(1, math.ceil(inp.rate / (ch.sustainable[1] * inp.headroom)))
    p = confirm or ([ch.at_planned] if ch.at_planned else [])
    med = (lambda k: sorted(getattr(x, k) for x in p)[len(p) // 2]) if p else (lambda k: None)
    rng = (lambda k: [min(getattr(x, k) for x in p), max(getattr(x, k) for x in p)]) if p else (lambda k: None)
    costs = cost(inp, n)
    costs_lo = cost(inp, lo_n)
    cpu = inp.cores_per_replica
    out["chosen"] = {
        "model": ch.variant.model, "version": ch.variant.version, "variant": ch.variant.variant,
        "precision": ch.variant.precision, "config": ch.config.to_dict(), "label": ch.config.label_for(cpu),
        "max_batch_size": ch.variant.max_batch_size,
        "sustainable_rate": _interval(ch.sustainable), "replicas": n, "replicas_range": [lo_n, n],
        "planned_rate_per_replica": round(inp.rate / n, 3),
        "confirmation": {"rate": probe_rate(ch, inp), "runs": len(p), "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"),
                         "p99_range_ms": rng("p99_ms"), "queue_ms": med("queue_ms"), "compute_ms": med("compute_ms"),
                         "throughput": med("throughput"), **_confirmed(p, inp)},
        "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"), "queue_ms": med("queue_ms"), "compute_ms": med("compute_ms"),
        "resources": {"cpu": cpu, "memory_bytes": memory_request(ch.variant.model_bytes, peak_rss),
                      "model_bytes": ch.variant.model_bytes, "peak_rss_bytes": peak_rss},
    }
    if costs:
        # the spread: fewer replicas would do if the sustainable rate is at the top of its bracket
        out["chosen"]["cost_per_million"] = {"value": costs["per_million"],
                                             "interval": [costs_lo["per_million"], costs["per_million"]]}
        out["chosen"]["cost_per_month"] = {"value": costs["per_month"],
                                           "interval": [costs_lo["per_month"], costs["per_month"]]}
        out["chosen"]["currency"] = inp.currency
    if len(ranked) > 1:
        out["runner_up"] = {**notes[0], "replicas": ranked[1].replicas(inp)}
    out["ranking"] = notes
    return out


def _confirmed(points: list, inp: PlanInputs) -> dict:
    """The confirmation runs' p99s against the budget, through the decision rule."""
    from retool.speed import decide_sample

    if not points:
        return {"outcome": "undecided", "decision": None}
    d = decide_sample([p.p99_ms for p in points], inp.budget_p99_ms, higher_is_better=False)
    return {"outcome": d.outcome, "decision": d.to_dict()}


def failure(plan: dict) -> str | None:
    """Why the plan fails its gate (exit 6): nothing met the budget, or the confirmation missed it; None if it holds."""
    ch = plan.get("chosen")
    if not ch:
        return verdict(plan)
    conf = ch["confirmation"]
    if conf.get("outcome") == "fail":
        return (f"{verdict(plan)}; but the confirmation runs missed the budget ({conf['decision']['text']}): lower "
                f"the headroom or rerun on a quiet machine")
    return None


def verdict(plan: dict) -> str:
    inp = plan["inputs"]
    head = f"p99 <= {inp['budget_p99_ms']:g} ms at {inp['rate']:g} req/s ({inp['profile']})"
    ch = plan.get("chosen")
    if not ch:
        c = plan.get("closest")
        miss = f"; the closest, {c['label']}, misses by {c['over_budget_ms']:.2f} ms" if c else ""
        return f"{plan['family']}: no variant meets {head}{miss}"
    sr = ch["sustainable_rate"]
    txt = (f"{plan['family']}: serve {ch['model']} v{ch['version']} ({ch['variant']}) with {ch['label']} on "
           f"{ch['replicas']} replica(s) of {ch['resources']['cpu']} core(s) for {head}; sustainable "
           f"{sr['interval'][0]:g}-{sr['interval'][1]:g} req/s per replica")
    if ch.get("p99_ms") is not None:
        txt += f"; confirmed p99 {ch['p99_ms']:.2f} ms at {ch['confirmation']['rate']:g} req/s"
    if ch.get("cost_per_million"):
        c, m = ch["cost_per_million"], ch["cost_per_month"]
        cur = ch["currency"]
        txt += (f"; {c['value']:.4g} {cur} per million (range {c['interval'][0]:.4g}-{c['interval'][1]:.4g}), "
                f"{m['value']:.0f} {cur} per month")
    return txt


def markdown(plan: dict) -> str:
    """The plan as a table of candidates, then the choice: what plan.md and the terminal show."""
    inp = plan["inputs"]
    cur = inp.get("currency") or "USD"
    lines = [f"## Serving plan: {plan['family']}", "",
             f"Budget p99 <= {inp['budget_p99_ms']:g} ms at {inp['rate']:g} req/s, profile {inp['profile']}, "
             f"replicas of {inp['cores_per_replica']} core(s) at {inp['headroom']:g} headroom"
             + (f", {inp['price_per_hour']:g} {cur}/h each" if inp.get("price_per_hour") is not None else "") + ".",
             "", "| model | variant | configuration | sustainable req/s per replica | replicas | outcome |",
             "|---|---|---|---|---|---|"]
    chosen = plan.get("chosen") or {}
    rejected = {r["label"]: r["reason"] for r in plan.get("rejected", ())}
    ranking = {r["label"]: r["why"] for r in plan.get("ranking", ())}
    for c in plan.get("candidates", ()):
        sr = c.get("sustainable_rate")
        rate = f"{sr['interval'][0]:g}–{sr['interval'][1]:g}" if sr else "—"
        label = c.get("key") or f"{c['model']} v{c['version']}: {c['label']}"
        if chosen and c["model"] == chosen["model"] and c["config"] == chosen["config"]:
            outcome = "**chosen**"
        else:
            outcome = rejected.get(label) or ranking.get(label) or ""
        lines.append(f"| {c['model']} | {c['variant']} | {c['label']} | {rate} | {c.get('replicas') or '—'} | "
                     f"{outcome.replace('|', '/')} |")
    for d in plan.get("duplicates", ()):
        lines.append(f"| {d['model']} | | | | | {d['reason']} |")
    if chosen:
        conf = chosen["confirmation"]
        lines += ["", f"**Chosen:** {chosen['model']} v{chosen['version']} ({chosen['variant']}), {chosen['label']}, "
                      f"{chosen['replicas']} replica(s) (between {chosen['replicas_range'][0]} and "
                      f"{chosen['replicas_range'][1]} within the noise)."]
        if conf.get("p99_ms") is not None:
            lines.append(f"Confirmed at {conf['rate']:g} req/s per replica, Poisson arrivals, {conf['runs']} runs: "
                         f"p50 {conf['p50_ms']:.2f} ms, p99 {conf['p99_ms']:.2f} ms (range "
                         f"{conf['p99_range_ms'][0]:.2f}–{conf['p99_range_ms'][1]:.2f}), of which queue "
                         f"{conf['queue_ms']:.2f} ms and compute {conf['compute_ms']:.2f} ms on the server"
                         + {"pass": "", "fail": " — **the confirmation missed the budget**"}.get(
                             conf.get("outcome"), " — the confirmation is within the noise of the budget") + ".")
        if chosen.get("cost_per_million"):
            c, m = chosen["cost_per_million"], chosen["cost_per_month"]
            lines.append(f"Cost: {c['value']:.4g} {cur} per million inferences (range {c['interval'][0]:.4g}–"
                         f"{c['interval'][1]:.4g}), {m['value']:.0f} {cur} per month (range "
                         f"{m['interval'][0]:.0f}–{m['interval'][1]:.0f}).")
        res = chosen["resources"]
        lines.append(f"Per replica: {res['cpu']} CPU, {res['memory_bytes'] / 2**20:.0f} MiB memory request"
                     + (f" (peak RSS measured {res['peak_rss_bytes'] / 2**20:.0f} MiB)" if res.get("peak_rss_bytes")
                        else "") + ".")
        if plan.get("runner_up"):
            lines.append(f"Runner-up: {plan['runner_up']['label']}: {plan['runner_up']['why']}.")
    else:
        c = plan.get("closest")
        lines += ["", "**No variant meets the budget**" + (f"; the closest, {c['label']}, misses by "
                                                           f"{c['over_budget_ms']:.2f} ms." if c else ".")]
    if plan.get("machine"):
        from retool.machine import describe

        lines.append(f"Machine before measuring: {describe(plan['machine'])}")
    lines += ["", f"Server: {plan.get('server', '')}. Rule: {plan.get('rule', '')}."]
    return "\n".join(lines)
