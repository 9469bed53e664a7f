"""The house: no import circles between the project's own modules (function-level imports count too)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: import name prefix -> folder, as pyproject.toml's package-dir maps them
PACKAGES = {"retool.converter": "converter", "retool.optimizers": "optimizers", "retool.validators": "validators",
            "retool": "retool", "bench": "bench"}


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    for name, folder in PACKAGES.items():
        if rel.parts[0] == folder:
            parts = [name, *rel.parts[1:]]
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join(parts)
    raise ValueError(path)


def _graph() -> dict[str, set[str]]:
    files = [p for folder in set(PACKAGES.values()) for p in (ROOT / folder).rglob("*.py")]
    mods = {_module_of(p): p for p in files}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block)
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run: no circle at import time
                continue
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                if n in mods and n != mod and not mods[n].name == "__init__.py":
                    graph[mod].add(n)
    return graph


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    """None at all, lazy imports included: a shared piece moves down into a module both sides import (issue 26
    broke the last four: converter base/core, validators core/reports, the TF loaders, publish index/revision)."""
    assert _cycles(_graph()) == []


def test_the_checker_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
