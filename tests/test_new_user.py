"""What a new user meets first: install lines, small CLI wording, errors that keep their substance."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_install_line_points_at_the_unrelated_pypi_project():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            if "pip install" in line:
                assert not re.search(r"pip install[^`]*'retool\[", line) or "git+" in line, f"{doc.name}: {line}"
    readme = (ROOT / "README.md").read_text()
    assert "pip install -c constraints.txt '.[torch]'" in readme and "git+" in readme


# -- publish: a report about another file; an identical file -----------------------------------

def test_publish_refuses_a_report_about_another_file_unless_forced(tmp_path, cli):
    import json

    from fixtures.onnx_tiny import linear
    from retool.onnx_info import artifact_from_onnx
    from retool.types import CheckResult, Report

    a = linear(tmp_path / "a.onnx")
    b = linear(tmp_path / "b.onnx", seed=3)
    rep = tmp_path / "b.report.json"
    rep.write_text(Report("validate", artifact_from_onnx(b), (CheckResult("parity", True),), {}).to_json())
    repo = tmp_path / "repo"
    r = cli("publish", a, "--repo", repo, "--name", "m", "--report", rep)
    assert r.code == 7 and "about another file" in r.err and "--force" in r.err and "Traceback" not in r.err
    assert not (repo / "m" / "1").exists()
    r = cli("publish", a, "--repo", repo, "--name", "m", "--report", rep, "--force", "--json")
    assert r.code == 0, r.err
    m = json.loads((repo / "m" / "1" / "manifest.json").read_text())
    assert m["forced"] and any("another file" in x for x in m["forced_reasons"])


def test_republishing_an_identical_file_makes_no_new_version_unless_asked(tmp_path, cli):
    from fixtures.onnx_tiny import linear
    from retool.publish import open_repo, publish

    a = linear(tmp_path / "a.onnx")
    repo = tmp_path / "repo"
    assert publish(a, repo, "m").version == 1
    res = publish(a, repo, "m", alias="staging")
    assert res.unchanged and res.version == 1 and open_repo(repo).versions("m") == [1]
    assert open_repo(repo).aliases("m")["staging"]["version"] == 1
    r = cli("publish", a, "--repo", repo, "--name", "m")
    assert r.code == 0 and "identical to m version 1" in r.out and "--republish" in r.out
    r = cli("publish", a, "--repo", repo, "--name", "m", "--republish")
    assert r.code == 0 and open_repo(repo).versions("m") == [1, 2]
