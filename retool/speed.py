"""The one speed-up quantity, its spread, the one decision rule, and the one way they are printed.

``speedup = reference p50 / candidate p50``: above 1 the candidate is faster.
Its descriptive spread is the inter-quartile range of the *paired* per-round
ratios ``reference[i] / candidate[i]`` (both variants ran in the same round, so
noise that hit the round hits both). A speed-up whose IQR contains 1, or that is
within ``NOISE_FLOOR`` of 1, is "no measurable difference".

**The decision rule.** Every timing that decides something (a gate, cpu-auto's
pick, the accuracy search's "fastest", the serving plan, bench's compare) goes
through :func:`decide`: a point estimate with a confidence interval against a
threshold gives

* ``pass``: the whole interval is on the good side of the threshold;
* ``fail``: the whole interval is on the bad side;
* ``undecided``: it straddles the threshold. :func:`decide_until` then measures
  more, up to a time budget; if still undecided the caller takes its safe default
  (the higher precision, the configuration already published, or the exit code
  chosen with ``--undecided``).

The interval is a **percentile bootstrap over paired rounds** (2000 resamples,
seeded, so the same samples give the same answer): whole rounds are resampled,
keeping each reference time with the candidate time of its round, and the ratio
of medians is recomputed for each resample. Why: round-to-round load (other
processes, frequency changes) is shared by both variants of a round, so pairing
cancels it; the bootstrap makes no normality assumption, and the timings of a busy
machine are skewed with long tails; the median ignores the few stalled runs. The
IQR, by contrast, describes spread, not uncertainty of the estimate, and a
point estimate alone (what gates used to read) flips on a busy machine. With fewer
than ``MIN_ROUNDS`` rounds there is no interval worth the name: it is (0, inf),
which is always undecided. One-sample figures (a p99, a throughput) use
:func:`sample_interval`, the same bootstrap over the samples.

Every command, report and summary prints speed-ups with :func:`format_speedup`,
and decisions with :attr:`Decision.text`, so the wording can change here and
nowhere else (docs/validate.md, "How a timing decides"). numpy only (no frameworks).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

#: Differences smaller than this (2 %) are never called measurable, however steady the timings.
NOISE_FLOOR = 0.02

FASTER, SLOWER, NONE = "faster", "slower", "none"


def verdict(value: float | None, iqr: Sequence[float] | None = None) -> str | None:
    """"faster", "slower" or "none" (inside the noise); None when there is no value."""
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    if abs(value - 1.0) < NOISE_FLOOR:
        return NONE
    if iqr is not None and len(iqr) == 2 and iqr[0] is not None and iqr[1] is not None:
        lo, hi = float(iqr[0]), float(iqr[1])
        if lo <= 1.0 <= hi:
            return NONE
        return FASTER if lo > 1.0 else SLOWER
    return FASTER if value > 1.0 else SLOWER


def _paired_series(reference: Sequence[float], candidate: Sequence[float]):
    """Both series as arrays cut to the shorter, and the ratio of their medians (the speed-up)."""
    import numpy as np

    r = np.asarray(reference, dtype=np.float64).ravel()
    c = np.asarray(candidate, dtype=np.float64).ravel()
    n = min(r.size, c.size)
    if n == 0:
        raise ValueError("a speed-up needs samples of both variants")
    r, c = r[:n], c[:n]
    cmed = float(np.median(c))
    return r, c, (float(np.median(r)) / cmed if cmed > 0 else math.inf)


def paired(reference_ms: Sequence[float], candidate_ms: Sequence[float]) -> dict:
    """Speed-up of the candidate over the reference from paired per-round samples (ms).

    Returns ``{"speedup", "iqr": [p25, p75], "rounds", "verdict", "text"}``; ``speedup``
    is the ratio of the medians (the convention), the IQR that of the per-round ratios.
    """
    import numpy as np

    r, c, value = _paired_series(reference_ms, candidate_ms)
    ok = c > 0
    ratios = r[ok] / c[ok]
    iqr = [round(float(np.percentile(ratios, 25)), 4), round(float(np.percentile(ratios, 75)), 4)] if ratios.size else None
    return stats(value, iqr, int(r.size))


def stats(value: float, iqr: Sequence[float] | None, rounds: int | None = None) -> dict:
    v = verdict(value, iqr)
    out = {"speedup": round(float(value), 4) if math.isfinite(value) else value,
           "iqr": list(iqr) if iqr is not None else None, "rounds": rounds, "verdict": v}
    out["text"] = format_speedup(value, iqr, v)
    return out


def format_speedup(value: float | None, iqr: Sequence[float] | None = None, verdict_: str | None = None,
                   *, spread: bool = True, label: str = "IQR") -> str:
    """"1.32× faster (IQR 1.28–1.36)", "0.75× (slower; IQR 0.72–0.78)", "no measurable difference (1.01×, ...)".

    ``verdict_`` defaults to :func:`verdict` of ``value`` and ``iqr``; ``spread=False`` leaves the IQR out.
    """
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return "n/a (candidate time 0)"
    v = verdict_ or verdict(value, iqr)
    sp = f"{label} {_fmt(iqr[0])}–{_fmt(iqr[1])}" if (spread and iqr and None not in iqr) else ""
    if v == NONE:
        return f"no measurable difference ({value:.2f}×" + (f", {sp})" if sp else ")")
    if v == SLOWER:
        return f"{value:.2f}× (slower" + (f"; {sp})" if sp else ")")
    return f"{value:.2f}× faster" + (f" ({sp})" if sp else "")


def format_decision(d: "Decision | Mapping") -> str:
    """A speed-up decision in the speed-up wording, with its confidence interval:
    "1.32× faster (95% CI 1.28–1.36)", "no measurable difference (1.02×, 95% CI 0.97–1.08)"."""
    if isinstance(d, Mapping):
        est, (lo, hi), conf = d["estimate"], d["interval"], d.get("confidence", CONFIDENCE)
        lo = float(lo) if lo is not None else math.nan
        hi = float(hi) if hi is not None else math.nan
        est = float(est)
    else:
        est, (lo, hi), conf = d.estimate, d.interval, d.confidence
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return format_speedup(est, None, NONE) + f" (no {conf * 100:g}% CI)"
    return format_speedup(est, [lo, hi], label=f"{conf * 100:g}% CI")


def format_entry(entry: Mapping | float | None, *, spread: bool = True) -> str:
    """:func:`format_speedup` of a stored entry: a :func:`paired` dict, or a bare number (no spread known)."""
    if isinstance(entry, Mapping):
        return format_speedup(entry.get("speedup"), entry.get("iqr"), entry.get("verdict"), spread=spread)
    return format_speedup(entry, None, spread=spread)


def worst(entries: Mapping[str, Mapping | float]) -> tuple[str, Mapping | float] | None:
    """The (batch, entry) with the lowest speed-up, or None."""
    def val(e):
        x = e.get("speedup") if isinstance(e, Mapping) else e
        return math.inf if x is None else float(x)

    items = [(k, e) for k, e in entries.items() if e is not None]
    return min(items, key=lambda t: val(t[1])) if items else None


# ---------------------------------------------------------------------------------------------------------------
# The decision rule

PASS, FAIL, UNDECIDED = "pass", "fail", "undecided"
#: Fewer paired rounds than this give no interval: (0, inf), always undecided.
MIN_ROUNDS = 3
CONFIDENCE = 0.95
RESAMPLES = 2000
#: Bootstrap resamples are drawn in chunks so a 10 000-round series does not need a 2000 x 10 000 array at once.
_CHUNK_CELLS = 2_000_000


@dataclass(frozen=True)
class Decision:
    """One timing-based decision: the estimate, its interval, the threshold, and the outcome."""

    outcome: str  # pass | fail | undecided
    estimate: float
    interval: tuple[float, float]
    threshold: float
    higher_is_better: bool
    confidence: float  # 0: the interval is a bound (a bracket, a stability bound), not a confidence interval
    rule: str
    samples: int
    #: "×" for ratios, "ms" for latencies, "/s" for throughputs: only for the wording
    unit: str = "×"
    #: seconds spent measuring more because the first measurement was undecided
    extra_s: float = 0.0
    #: why the outcome is what it is when a default or a budget decided (empty otherwise)
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.outcome == PASS

    @property
    def undecided(self) -> bool:
        return self.outcome == UNDECIDED

    def to_dict(self) -> dict:
        d = asdict(self)
        d["interval"] = [_num(x) for x in self.interval]
        d["estimate"] = _num(self.estimate)
        d["text"] = self.text
        return d

    @property
    def text(self) -> str:
        """e.g. "1.32× (95% CI 1.28–1.36) >= 1.2×: pass"."""
        op = ">=" if self.higher_is_better else "<="
        u = self.unit if self.unit in ("×", "x", "") else f" {self.unit}"
        pct = f"{self.confidence * 100:g}%"
        lo, hi = self.interval
        if math.isfinite(lo) and math.isfinite(hi) and hi > 0 and self.confidence == 0:
            ci = f"bounds {_fmt(lo)}–{_fmt(hi)}"  # a bracket or a stability bound, not a statistical interval
        elif math.isfinite(lo) and math.isfinite(hi) and hi > 0:
            ci = f"{pct} CI {_fmt(lo)}–{_fmt(hi)}"
        else:
            ci = f"no {pct} CI: {self.samples} sample(s)"
        out = f"{_fmt(self.estimate)}{u} ({ci}) {op} {self.threshold:g}{u}: {self.outcome}"
        return out + (f" ({self.note})" if self.note else "")

    def with_outcome(self, outcome: str, note: str) -> "Decision":
        """This decision with its outcome replaced by a default, and the reason."""
        from dataclasses import replace

        return replace(self, outcome=outcome, note=note)


def _num(x: float):
    x = float(x)
    return round(x, 6) if math.isfinite(x) else (None if math.isnan(x) else str(x))


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "inf" if x > 0 else "n/a"
    return f"{x:.2f}" if abs(x) < 1000 else f"{x:.0f}"


def _rng(seed: int):
    import numpy as np

    return np.random.Generator(np.random.PCG64(seed))


def _stat_fn(stat: str):
    import numpy as np

    if stat == "median":
        return lambda a: np.median(a, axis=-1)
    if stat == "mean":
        return lambda a: np.mean(a, axis=-1)
    if stat.startswith("p") and stat[1:].replace(".", "", 1).isdigit():
        q = float(stat[1:])
        return lambda a: np.percentile(a, q, axis=-1)
    raise ValueError(f"unknown statistic {stat!r}; use median, mean or pNN (p99)")


def _boot(arrays, fn, *, confidence: float, resamples: int, seed: int):
    """Percentile interval of ``fn(*resampled arrays)``, resampling the same indices in every array."""
    import numpy as np

    n = arrays[0].size
    rng = _rng(seed)
    per = max(1, _CHUNK_CELLS // max(n, 1))
    vals = []
    done = 0
    while done < resamples:
        k = min(per, resamples - done)
        idx = rng.integers(0, n, size=(k, n))
        vals.append(fn(*(a[idx] for a in arrays)))
        done += k
    v = np.concatenate(vals)
    v = v[np.isfinite(v)] if np.isfinite(v).any() else v
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(v, alpha)), float(np.quantile(v, 1.0 - alpha))


def _check_conf(confidence: float, resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence {confidence}: must be between 0 and 1")
    if resamples < 100:
        raise ValueError(f"resamples {resamples}: use at least 100")


def paired_ratio_interval(reference: Sequence[float], candidate: Sequence[float], *, confidence: float = CONFIDENCE,
                          resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(estimate, lo, hi) of the speed-up ``median(reference) / median(candidate)``.

    The interval is a percentile bootstrap over paired rounds (round i of both series is kept
    together). Series of unequal length are cut to the shorter. Fewer than ``MIN_ROUNDS``
    rounds give the interval (0, inf).
    """
    import numpy as np

    _check_conf(confidence, resamples)
    r, c, est = _paired_series(reference, candidate)
    n = r.size
    if n < MIN_ROUNDS:
        return est, 0.0, math.inf

    def ratio(rr, cc):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.median(rr, axis=-1) / np.median(cc, axis=-1)

    lo, hi = _boot((r, c), ratio, confidence=confidence, resamples=resamples, seed=seed)
    return est, lo, hi


def sample_interval(samples: Sequence[float], *, stat: str = "median", confidence: float = CONFIDENCE,
                    resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(estimate, lo, hi) of ``stat`` ("median", "mean", "p99", any "pNN") of one series, by bootstrap.

    A tail percentile needs many samples: with fewer than ``MIN_ROUNDS``, or fewer than the
    tail holds (p99 of 50 samples is the slowest run), the interval is wide on purpose.
    """
    import numpy as np

    _check_conf(confidence, resamples)
    a = np.asarray(samples, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("an interval needs at least one sample")
    fn = _stat_fn(stat)
    est = float(fn(a))
    if a.size < MIN_ROUNDS:
        return est, 0.0, math.inf
    lo, hi = _boot((a,), fn, confidence=confidence, resamples=resamples, seed=seed)
    return est, lo, hi


def rule_text(kind: str = "ratio", *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
              stat: str = "median") -> str:
    """The one line naming the method, stored with every decision."""
    pct = f"{confidence * 100:g}%"
    if kind == "ratio":
        return f"{pct} paired bootstrap CI of the median ratio, {resamples} resamples"
    return f"{pct} bootstrap CI of the {stat}, {resamples} resamples"


def decide(estimate: float, lo: float, hi: float, threshold: float, *, higher_is_better: bool = True,
           confidence: float = CONFIDENCE, rule: str = "", samples: int = 0, unit: str = "×") -> Decision:
    """pass: the whole interval [lo, hi] is on the good side of ``threshold``; fail: the whole
    interval on the bad side; undecided: it straddles (or touches) the threshold."""
    lo, hi = float(lo), float(hi)
    if math.isnan(lo) or math.isnan(hi):
        outcome = UNDECIDED
    elif higher_is_better:
        outcome = PASS if lo >= threshold else FAIL if hi < threshold else UNDECIDED
    else:
        outcome = PASS if hi <= threshold else FAIL if lo > threshold else UNDECIDED
    return Decision(outcome, float(estimate), (lo, hi), float(threshold), bool(higher_is_better),
                    float(confidence), rule, int(samples), unit)


def decide_ratio(reference: Sequence[float], candidate: Sequence[float], threshold: float, *,
                 higher_is_better: bool = True, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                 seed: int = 0) -> Decision:
    """The speed-up ``reference / candidate`` (paired rounds) against ``threshold``."""
    est, lo, hi = paired_ratio_interval(reference, candidate, confidence=confidence, resamples=resamples, seed=seed)
    return decide(est, lo, hi, threshold, higher_is_better=higher_is_better, confidence=confidence,
                  rule=rule_text("ratio", confidence=confidence, resamples=resamples),
                  samples=min(len(reference), len(candidate)))


def decide_sample(samples: Sequence[float], threshold: float, *, stat: str = "median", higher_is_better: bool = False,
                  confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0,
                  unit: str = "ms") -> Decision:
    """One series' ``stat`` against ``threshold`` (a p99 budget: ``stat="p99"``, lower is better)."""
    est, lo, hi = sample_interval(samples, stat=stat, confidence=confidence, resamples=resamples, seed=seed)
    return decide(est, lo, hi, threshold, higher_is_better=higher_is_better, confidence=confidence,
                  rule=rule_text("sample", confidence=confidence, resamples=resamples, stat=stat),
                  samples=len(samples), unit=unit)


def decide_until(measure_more: Callable[[], tuple], first: tuple, threshold: float, *, time_budget_s: float,
                 higher_is_better: bool = True, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                 seed: int = 0, stat: str = "median", unit: str | None = None, max_tries: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> Decision:
    """Decide on ``first``; while undecided, append ``measure_more()`` and decide again, until the
    time budget (seconds of extra measuring) is spent.

    ``first`` and what ``measure_more`` returns are tuples of sequences: two (reference,
    candidate: the paired speed-up) or one (a single series judged by ``stat``). The result's
    ``extra_s`` is the time spent measuring more; a result still undecided says so in ``note``.
    """
    series = [list(map(float, s)) for s in first]
    if len(series) not in (1, 2):
        raise ValueError("first must hold one series or two (reference, candidate)")

    def judge() -> Decision:
        if len(series) == 2:
            return decide_ratio(series[0], series[1], threshold, higher_is_better=higher_is_better,
                                confidence=confidence, resamples=resamples, seed=seed)
        return decide_sample(series[0], threshold, stat=stat, higher_is_better=higher_is_better,
                             confidence=confidence, resamples=resamples, seed=seed, unit=unit or "ms")

    d = judge()
    t0 = clock()
    tries = 0
    while d.outcome == UNDECIDED and tries < max_tries and clock() - t0 < time_budget_s:
        more = measure_more()
        if len(more) != len(series):
            raise ValueError(f"measure_more returned {len(more)} series, expected {len(series)}")
        for s, m in zip(series, more):
            s.extend(map(float, m))
        tries += 1
        d = judge()
    extra = clock() - t0 if tries else 0.0
    from dataclasses import replace

    note = ""
    if d.outcome == UNDECIDED:
        note = (f"still undecided after {extra:.1f} s more measuring (--time-budget {time_budget_s:g} s)"
                if tries else "undecided; no time budget to measure more")
    d = replace(d, extra_s=round(extra, 3), note=note)
    if unit is not None:
        d = replace(d, unit=unit)
    return d


def resolve(d: Decision, undecided: str, why: str = "") -> Decision:
    """The decision with an undecided outcome replaced by the caller's safe default (``pass``/``fail``)."""
    if d.outcome != UNDECIDED:
        return d
    if undecided not in (PASS, FAIL):
        raise ValueError(f"undecided default must be pass or fail, got {undecided!r}")
    reason = why or f"undecided, counted as {undecided} (--undecided {undecided})"
    return d.with_outcome(undecided, (d.note + "; " if d.note else "") + reason)


@dataclass(frozen=True)
class Choice:
    """Which of several candidates is fastest, judged pairwise by the decision rule."""

    name: str
    reason: str
    #: candidate name -> the decision "is it faster than the pick so far"
    decisions: dict = field(default_factory=dict)
    tied: tuple = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "reason": self.reason, "tied": list(self.tied),
                "decisions": {k: v.to_dict() for k, v in self.decisions.items()}}


def choose_fastest(samples: Mapping[str, Sequence[float]], preference: Sequence[str], *,
                   min_gain: float = 1.0 + NOISE_FLOOR, confidence: float = CONFIDENCE) -> Choice:
    """The fastest candidate, preferring earlier names in ``preference`` (higher precision first)
    unless a later one is *decidedly* faster: its paired speed-up interval over the pick so far
    lies wholly above ``min_gain``. Candidates tied within the noise keep the earlier one.

    ``samples`` are paired rounds (the same round index ran every candidate).
    """
    names = [n for n in preference if n in samples]
    if not names:
        raise ValueError("no candidate has samples")
    pick = names[0]
    decisions: dict[str, Decision] = {}
    tied: list[str] = []
    for n in names[1:]:
        d = decide_ratio(samples[pick], samples[n], min_gain, confidence=confidence)
        decisions[n] = d
        if d.outcome == PASS:
            pick, tied = n, []
        elif d.outcome == UNDECIDED:
            tied.append(n)
    if tied:
        reason = (f"{pick} kept: {', '.join(tied)} not decidedly faster (tied within the noise, "
                  f"{decisions[tied[0]].text}); the higher precision wins a tie")
    elif pick == names[0]:
        reason = f"{pick} kept: no other candidate is decidedly faster"
    else:
        reason = f"{pick} is decidedly faster: {decisions[pick].text}"
    return Choice(pick, reason, decisions, tuple(tied))
