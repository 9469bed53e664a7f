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
