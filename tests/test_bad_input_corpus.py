"""The bad-input corpus (fixtures/bad_inputs.py): for each case, the exit code, one line on stderr
naming the problem, no traceback, and no new file at the output.

Cases run in-process; those that need a full disk run in a subprocess under RLIMIT_FSIZE (with SIGXFSZ
ignored, a write past the limit fails with EFBIG, as it would with ENOSPC on a full disk).
"""
from __future__ import annotations

import resource
import signal
import subprocess
import sys

import pytest

from fixtures.bad_inputs import CASES, error_lines, materialise, snapshot
from fixtures.proc import ROOT


def _limited(fsize: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return pre


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, cli):
    d = tmp_path / "case"
    argv = materialise(case, d)
    before = snapshot(d)
    if case.fsize is None:
        r = cli(*argv)
        code, err = r.code, r.err
    else:
        proc = subprocess.run([sys.executable, "-m", "retool", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, preexec_fn=_limited(case.fsize))
        code, err = proc.returncode, proc.stderr
    lines = error_lines(err)
    assert "Traceback" not in err, err
    assert code == case.code, err
    assert len(lines) == 1 and lines[0].startswith("retool: error: "), err
    assert case.needle in lines[0], lines[0]
    after = snapshot(d)
    assert after == before, f"left at the output: {sorted(set(after) - set(before))}"


def test_every_case_has_a_unique_id():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("value, spec, expected", [
    ("8", dict(kind=int, min=1, max=65536), 8),
    (5, dict(kind=float, min=0, min_open=True), 5),  # an int stays an int: cache keys and reports say 5
    ("2.5", dict(kind=float, min=0), 2.5),
    (4.0, dict(kind=int, min=1), 4),
    ("0", dict(kind=float, min=0, max=86400), 0.0),
])
def test_check_number_accepts(value, spec, expected):
    from retool.commands.common import check_number

    got = check_number(value, "--x", **spec)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, spec, words", [
    ("nan", dict(kind=float), "nan is not a finite number; expected a finite number"),
    (float("inf"), dict(kind=float, min=0), "inf is not a finite number; expected a number >= 0"),
    ("0", dict(kind=float, min=0, min_open=True), "0 is out of range; expected a number > 0"),
    ("100", dict(kind=float, min=0, max=100, max_open=True), "100 is out of range; expected a number >= 0 and < 100"),
    (True, dict(kind=int, min=0), "True is not a number"),
    ("1.5", dict(kind=int, min=1, max=8), "1.5 is not an integer; expected an integer from 1 to 8"),
    (10**400, dict(kind=float), "(401 characters) is out of range"),
    (" 7", dict(kind=int, min=8), "' 7' is out of range"),
])
def test_check_number_refuses_with_the_range(value, spec, words):
    from retool.commands.common import check_number
    from retool.errors import UsageError

    with pytest.raises(UsageError) as ei:
        check_number(value, "f.yaml:3: gates.max_p99_ms", **spec)
    assert str(ei.value).startswith("f.yaml:3: gates.max_p99_ms: ") and words in str(ei.value), str(ei.value)
