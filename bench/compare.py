"""Compare two ``make bench`` result files; flag every figure that got worse by more than 10 %.

    .venv/bin/python bench/compare.py OLD.json NEW.json [--threshold 0.10]

Every metric (a dict with ``median`` or ``value`` and ``better``) found at the same
path in both files is compared by the one decision rule (retool.speed): a repeated figure
(``median``, ``p25``/``p75``, ``n``) has a 95 % interval for its median (the notched-box
interval, median ± 1.57·IQR/√n, McGill et al. 1978: the runs are not paired, so no bootstrap
over rounds), and "worse by" gets the interval that the old and new intervals allow. It is a
REGRESSION when the whole interval is worse than the threshold, UNDECIDED when it straddles
it (counted as ``--undecided``, default pass: a regression must be shown, as for
not-slower), fine otherwise. A single figure (``value``) is compared as it is.
Exit status: 0 when nothing regressed, 1 when at least one figure did (or, in the new file's
``peers`` section, retool is behind plain onnxruntime.quantization), 2 when a file cannot be read.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.stats import central, is_metric  # noqa: E402
from retool import speed  # noqa: E402

DEFAULT_THRESHOLD = 0.10
#: half-width of the 95 % interval of a median, in IQRs times 1/sqrt(n) (notched box plots)
NOTCH = 1.57


@dataclass(frozen=True)
class Change:
    path: str
    old: float
    new: float
    better: str
    unit: str
    #: Relative change in the bad direction: +0.25 = 25 % worse, -0.1 = 10 % better.
    worse_by: float
    #: The old and new spreads (p25-p75) overlap: the change may be noise.
    overlap: bool | None
    #: (lo, hi) of worse_by from the two medians' intervals; None for single figures
    interval: tuple[float, float] | None = None

    @property
    def label(self) -> str:
        if self.interval is None:
            return f"{self.worse_by * 100:+.1f} %"
        lo, hi = self.interval
        return f"{self.worse_by * 100:+.1f} % ({lo * 100:+.1f}..{hi * 100:+.1f})"

    def decision(self, threshold: float = DEFAULT_THRESHOLD) -> speed.Decision:
        """Regression test by the one rule: "pass" = not worse than ``threshold``, "fail" = worse."""
        lo, hi = self.interval if self.interval is not None else (self.worse_by, self.worse_by)
        return speed.decide(self.worse_by, lo, hi, threshold, higher_is_better=False,
                            rule="95% interval of each median (median ± 1.57 IQR/sqrt(n)), old vs new"
                            if self.interval is not None else "single figures, compared as they are",
                            unit="")


def metrics(tree, prefix: str = "") -> dict[str, dict]:
    """Every metric dict in a result tree, by dotted path. Skipped/errored parts have none."""
    out = {}
    if is_metric(tree):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            if k in ("machine", "settings"):
                continue
            out.update(metrics(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _overlap(a: dict, b: dict) -> bool | None:
    if "p25" not in a or "p25" not in b:
        return None
    return a["p25"] <= b["p75"] and b["p25"] <= a["p75"]


def median_interval(m: dict) -> tuple[float, float] | None:
    """95 % interval of a metric's median from its IQR and count; None for a single figure."""
    if "median" not in m or m.get("n") is None or "p25" not in m or "p75" not in m:
        return None
    n = max(int(m["n"]), 1)
    half = NOTCH * (float(m["p75"]) - float(m["p25"])) / n ** 0.5
    if n < speed.MIN_ROUNDS:
        half = max(half, abs(float(m["median"])))  # 1-2 samples: no interval worth the name
    return float(m["median"]) - half, float(m["median"]) + half


def _worse_interval(a: dict, b: dict, better: str) -> tuple[float, float] | None:
    ia, ib = median_interval(a), median_interval(b)
    if ia is None or ib is None or ia[0] <= 0:
        return None if ia is None or ib is None else (float("-inf"), float("inf"))
    if better == "lower":  # new / old - 1
        return ib[0] / ia[1] - 1.0, ib[1] / ia[0] - 1.0
    return 1.0 - ib[1] / ia[0], 1.0 - ib[0] / ia[1]


def compare(old: dict, new: dict) -> tuple[list[Change], list[str], list[str]]:
    """(changes for paths in both, paths only in old, paths only in new)."""
    mo, mn = metrics(old.get("sections", old)), metrics(new.get("sections", new))
    changes = []
    for path in sorted(mo.keys() & mn.keys()):
        a, b = mo[path], mn[path]
        va, vb = central(a), central(b)
        better = b.get("better", a.get("better"))
        if va == 0:
            worse = 0.0 if vb == va else (float("inf") if (vb > va) == (better == "lower") else float("-inf"))
        else:
            worse = (vb - va) / abs(va) if better == "lower" else (va - vb) / abs(va)
        changes.append(Change(path, va, vb, better, b.get("unit", ""), worse, _overlap(a, b),
                              _worse_interval(a, b, better)))
    return changes, sorted(mo.keys() - mn.keys()), sorted(mn.keys() - mo.keys())


def regressions(changes: list[Change], threshold: float = DEFAULT_THRESHOLD, undecided: str = "pass") -> list[Change]:
    """Figures worse than ``threshold``: decided so, or undecided and ``undecided == "fail"``."""
    return [c for c in changes if c.decision(threshold).outcome == "fail"
            or (undecided == "fail" and c.decision(threshold).outcome == "undecided")]


def undecided(changes: list[Change], threshold: float = DEFAULT_THRESHOLD) -> list[Change]:
    return [c for c in changes if c.decision(threshold).outcome == "undecided"]


def _context_warnings(old: dict, new: dict) -> list[str]:
    warns = []
    mo, mn = old.get("machine") or {}, new.get("machine") or {}
    for k in ("cpu_model", "cpus_usable", "mem_total_bytes"):
        if mo.get(k) != mn.get(k):
            warns.append(f"different machines: {k} {mo.get(k)!r} -> {mn.get(k)!r}")
    for which, d in (("old", old), ("new", new)):
        busy = [name for name, sec in (d.get("sections") or {}).items()
                if isinstance(sec, dict) and (sec.get("machine") or {}).get("busy")]
        if busy or (d.get("machine") or {}).get("busy"):
            warns.append(f"{which} run timed on a busy machine ({', '.join(busy) or 'at start'}): its intervals are "
                         f"wide; rerun on a quiet machine, or pin threads")
    for k in ("onnxruntime", "torch", "tensorflow"):
        a, b = (mo.get("versions") or {}).get(k), (mn.get("versions") or {}).get(k)
        if a != b:
            warns.append(f"{k} {a} -> {b}")
    so, sn = old.get("settings") or {}, new.get("settings") or {}
    if so.get("quick") != sn.get("quick"):
        warns.append(f"one run is --quick (old quick={so.get('quick')}, new quick={sn.get('quick')}): figures differ in kind")
    if so.get("threads") != sn.get("threads"):
        warns.append(f"threads {so.get('threads')} -> {sn.get('threads')}")
    for name, sec in (new.get("sections") or {}).items():
        if isinstance(sec, dict) and sec.get("status", "ok") != "ok":
            warns.append(f"new run: section {name} {sec.get('status')}: {sec.get('reason', '')[:120]}")
    return warns


def behind_peers(new: dict) -> list[str]:
    """Where the new run's retool artifact is behind plain onnxruntime.quantization (section ``peers``).

    Latency counts only beyond the noise (the lower quartile of the paired ratios above 1)."""
    out = []
    models = ((new.get("sections") or {}).get("peers") or {}).get("models") or {}
    for model, m in models.items():
        for variant, r in ((m or {}).get("retool_over_peer") or {}).items():
            if r.get("behind"):
                out.append(f"{model}: {variant} is behind the peer in {', '.join(r['behind'])}")
    return out


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def load(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"compare: error: {path}: cannot read a result file ({exc}); "
                         f"pass two bench/results/*.json files written by bench/run.py")
    if not isinstance(data, dict) or "sections" not in data:
        raise SystemExit(f"compare: error: {path}: not a bench result (no 'sections'); "
                         f"pass files written by bench/run.py")
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                    help="flag figures worse by more than this fraction (default 0.10)")
    ap.add_argument("--all", action="store_true", help="list every compared figure, not only the flagged ones")
    ap.add_argument("--undecided", choices=("pass", "fail"), default="pass",
                    help="a figure whose interval straddles the threshold counts as this (default pass)")
    args = ap.parse_args(argv)
    try:
        old, new = load(args.old), load(args.new)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    changes, only_old, only_new = compare(old, new)
    bad = regressions(changes, args.threshold, args.undecided)
    unsure = undecided(changes, args.threshold)
    better = [c for c in changes if c.decision(-args.threshold).outcome == "pass" and c.worse_by < -args.threshold]
    for w in _context_warnings(old, new):
        print(f"note: {w}")
    shown = changes if args.all else [c for c in changes if c in bad or c in unsure]
    if shown:
        from retool.console import table

        rows = [[c.path, _fmt(c.old), _fmt(c.new), c.unit, c.better, c.label,
                 ("REGRESSION" if c in bad else "") + (" UNDECIDED" if c in unsure else "")
                 or ("better" if c in better else ""),
                 "" if c.overlap is None else ("yes" if c.overlap else "no")] for c in shown]
        print(table(["figure", "old", "new", "unit", "better", "worse by", "", "IQRs overlap"], rows))
    if only_old:
        print(f"{len(only_old)} figure(s) only in {args.old} (skipped or failed in the new run), e.g. {only_old[0]}")
    if only_new:
        print(f"{len(only_new)} figure(s) only in {args.new}, e.g. {only_new[0]}")
    print(f"{len(changes)} figures compared: {len(bad)} worse by more than {args.threshold:.0%}, "
          f"{len(better)} better by more than {args.threshold:.0%}, {len(unsure)} undecided (interval straddles "
          f"{args.threshold:.0%}; counted as {args.undecided})")
    behind = behind_peers(new)
    for line in behind:
        print(f"BEHIND PEER: {line}")
    return 1 if bad or behind else 0


if __name__ == "__main__":
    sys.exit(main())
