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
