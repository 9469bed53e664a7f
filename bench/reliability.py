"""Run the bad-input corpus (fixtures/bad_inputs.py) as a user would, one subprocess per case, and write
docs/reliability.md: tracebacks, exit 0 on failure, wrong exit codes, stderr that is not one line,
files left at the output, and hangs.

    python -m bench.reliability                    # writes docs/reliability.md
    python -m bench.reliability --out -            # prints the page instead
    python -m bench.reliability --before 1212aa0   # also runs the corpus on that commit, for comparison
    python -m bench.reliability --kills 20         # also the kill -9 campaign (bench/kills.py)
    python -m bench.reliability --kills 20 --no-corpus   # only the kills; the corpus part is kept

tests/test_bad_input_corpus.py asserts the same corpus case by case (in-process, faster).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import kills  # noqa: E402
from bench.machine import machine_info, section_machine, section_start  # noqa: E402
from fixtures.bad_inputs import CASES, Case, error_lines, materialise, snapshot  # noqa: E402

#: a case still running after this is a hang (the billion-laughs file once ran for minutes)
CASE_TIMEOUT_S = 120


@dataclass
class Outcome:
    case: Case
    code: int | None  # None: killed after CASE_TIMEOUT_S
    traceback: bool
    lines: int
    left: list[str]

    @property
    def problems(self) -> list[str]:
        out = []
        if self.code is None:
            out.append("hang")
        elif self.code == 0:
            out.append("exit 0 on failure")
        elif self.code != self.case.code:
            out.append(f"exit {self.code}, due {self.case.code}")
        if self.traceback:
            out.append("traceback")
        if self.code is not None and self.lines != 1:
            out.append(f"{self.lines} stderr lines")
        if self.left:
            out.append(f"left {', '.join(self.left[:3])}")
        return out


def _limit(fsize: int | None):
    def pre():
        os.setsid()  # a hang is killed with everything it started
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return pre


def checkout(commit: str, dest: Path) -> Path:
    """``commit``'s tree in ``dest``, importable as ``retool`` from there (PYTHONPATH=dest).

    The top-level converter/, optimizers/ and validators/ are linked into retool/ as the package-dir
    mapping in pyproject.toml does, so they win over this checkout's editable install."""
    tar = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    for sub in ("converter", "optimizers", "validators"):
        if (dest / sub).is_dir() and not (dest / "retool" / sub).exists():
            (dest / "retool" / sub).symlink_to(Path("..") / sub)
    return dest


def run_case(case: Case, work: Path, tree: Path = ROOT) -> Outcome:
    d = work / case.id
    argv = materialise(case, d)
    before = snapshot(d)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(tree)}
    proc = subprocess.Popen([sys.executable, "-m", "retool", *argv], cwd=tree, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_limit(case.fsize))
    try:
        _, err = proc.communicate(timeout=CASE_TIMEOUT_S)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        code = None
    after = snapshot(d)
    left = sorted(k for k in after if before.get(k) != after[k])
    return Outcome(case, code, "Traceback" in err, len(error_lines(err)), left)


def counts(outcomes: list[Outcome]) -> dict[str, int]:
    return {
        "tracebacks": sum(o.traceback for o in outcomes),
        "exit 0 on failure": sum(o.code == 0 for o in outcomes),
        "wrong exit code (not 0)": sum(o.code not in (None, 0, o.case.code) for o in outcomes),
        "stderr not exactly one line": sum(o.code is not None and o.lines != 1 for o in outcomes),
        "files left at the output (partial or new)": sum(bool(o.left) for o in outcomes),
        f"hangs (> {CASE_TIMEOUT_S} s)": sum(o.code is None for o in outcomes),
        "cases": len(outcomes),
    }


def page(outcomes: list[Outcome], machine: dict, started: str, seconds: float,
         before: tuple[str, list[Outcome]] | None = None) -> str:
    n = len(outcomes)
    count = counts(outcomes)
    old = counts(before[1]) if before else None
    old_by_id = {o.case.id: o for o in before[1]} if before else {}
    load = machine.get("loadavg_at_start")
    lines = [
        "# Reliability: bad input",
        "",
        "Produced by `python -m bench.reliability` (do not edit by hand). Each case of the bad-input corpus",
        "(`fixtures/bad_inputs.py`) runs as `python -m retool ...` in a fresh process; a case passes when it",
        "exits with its due code, prints exactly one line on stderr (progress lines aside) and no traceback,",
        "and leaves no new or changed file in its folder. Full-disk cases run under `RLIMIT_FSIZE` (a write",
        "past the limit fails with EFBIG, as on a full disk with ENOSPC). `tests/test_bad_input_corpus.py`",
        "asserts the same cases in the test suite.",
        "",
        f"- date: {started} (UTC), {seconds:.0f} s for {n} cases",
        f"- machine: {machine.get('cpu_model')}, {machine.get('cpus_usable')} usable cores"
        + (f", load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at start" if load else ""),
        f"- retool commit: {machine.get('git_commit')}",
        "",
        "## Counts",
        "",
        *((f"| over the corpus | now | at {before[0]} |", "|---|---|---|",
           *[f"| {k} | {v} | {old[k]} |" for k, v in count.items()]) if before else
          ("| over the corpus | count |", "|---|---|", *[f"| {k} | {v} |" for k, v in count.items()])),
        "",
        "## Cases",
        "",
        "| case | command | due | got | result |" + (f" at {before[0]} |" if before else ""),
        "|---|---|---|---|---|" + ("---|" if before else ""),
    ]
    for o in outcomes:
        cmd = " ".join(a.replace("{d}/", "") for a in o.case.argv)
        cmd = (cmd[:70] + " …" if len(cmd) > 72 else cmd).replace("|", "\\|")
        got = "hang" if o.code is None else str(o.code)
        row = f"| {o.case.id} | `{cmd}` | {o.case.code} | {got} | {'; '.join(o.problems) or 'ok'} |"
        if before:
            b = old_by_id.get(o.case.id)
            row += f" {('; '.join(b.problems) or 'ok') if b else '(not run)'} |"
        lines.append(row)
    lines.append("")
    return "\n".join(lines)


#: the kill -9 section's heading: what comes before it is the corpus's part of the page
KILLS_HEADING = "## kill -9"
NO_KILLS = (f"{KILLS_HEADING}\n\nNot measured yet: `python -m bench.reliability --kills 20` SIGKILLs publish, repo check,"
            "\nserve and loadtest at random points and counts orphans, verify failures and folders left.\n")


def splice(old: str | None, corpus: str | None, kills: str | None) -> str:
    """The page from the parts just produced; a part not rerun is kept from ``old`` (the page as it was)."""
    before, _, after = (old or "").partition("\n" + KILLS_HEADING)
    corpus = corpus if corpus is not None else before.rstrip("\n") + "\n"
    kills = kills if kills is not None else (KILLS_HEADING + after if after else NO_KILLS)
    return corpus.rstrip("\n") + "\n\n" + kills.rstrip("\n") + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"), help="the page, or - for stdout")
    ap.add_argument("-k", dest="only", help="run only the cases whose id contains this")
    ap.add_argument("--before", metavar="COMMIT", help="also run the corpus on this commit and show both")
    ap.add_argument("--kills", type=int, default=0, metavar="N",
                    help="also SIGKILL publish, repo check, serve and loadtest N times each (bench/kills.py)")
    ap.add_argument("--kill-commands", default=",".join(kills.COMMANDS), help="which commands to kill (comma-separated)")
    ap.add_argument("--kill-budget-s", type=float, help="start no new round of kills after this many seconds")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kills' delays")
    ap.add_argument("--no-corpus", action="store_true", help="run only the kills; keep the page's corpus part")
    args = ap.parse_args(argv)
    out = None if args.out == "-" else Path(args.out)
    old = out.read_text() if out is not None and out.exists() else None
    if args.no_corpus and old is None:
        ap.error(f"--no-corpus keeps the corpus part of {args.out}, which does not exist")
    kill_part, kill_problems = None, False
    if args.kills:
        names = [c.strip() for c in args.kill_commands.split(",") if c.strip()]
        if not set(names) <= set(kills.COMMANDS):
            ap.error(f"--kill-commands: choose among {', '.join(kills.COMMANDS)}")
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C ends the kills, even under nohup
        started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        info, block, t0 = machine_info(ROOT), section_start(), time.monotonic()
        cmds = kills.campaign(args.kills, names, args.seed, args.kill_budget_s)
        state = {**section_machine(info, block), "git_commit": info.get("git_commit")}
        kill_part = kills.section(cmds, state, started, time.monotonic() - t0, args.kills, args.seed)
        kill_problems = any(k.problems for c in cmds for k in c.kills) or any(c.typical_s is None for c in cmds)
        if args.no_corpus:
            return _write(args.out, splice(old, None, kill_part), kill_problems)
    machine = machine_info(ROOT)
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    t0 = time.monotonic()
    cases = [c for c in CASES if not args.only or args.only in c.id]
    outcomes = []
    before = None
    with tempfile.TemporaryDirectory(prefix="retool-reliability-") as work:
        for case in cases:
            o = run_case(case, Path(work) / "now")
            print(f"{case.id}: {'; '.join(o.problems) or 'ok'}", file=sys.stderr)
            outcomes.append(o)
        seconds = time.monotonic() - t0
        if args.before:
            tree = checkout(args.before, Path(work) / "tree")
            old = []
            for case in cases:
                o = run_case(case, Path(work) / "before", tree)
                print(f"{args.before} {case.id}: {'; '.join(o.problems) or 'ok'}", file=sys.stderr)
                old.append(o)
            before = (args.before, old)
    text = splice(old, page(outcomes, machine, started, seconds, before), kill_part)
    return _write(args.out, text, kill_problems or any(o.problems for o in outcomes))


def _write(out: str, text: str, problems: bool) -> int:
    if out == "-":
        print(text)
    else:
        Path(out).write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
