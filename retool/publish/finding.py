"""One thing wrong in a repository: what verify, the index and signing report (a leaf: imports nothing of retool)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    """One thing wrong in a repository, found by verify."""

    model: str
    version: int | None
    path: str
    problem: str  # changed | added | missing | incomplete | bad-manifest | bad-config | bad-alias
    detail: str = ""

    def to_dict(self) -> dict:
        return {"model": self.model, "version": self.version, "path": self.path, "problem": self.problem,
                "detail": self.detail}
