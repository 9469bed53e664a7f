"""Configuration YAML (pipeline files, gates files) read strictly, with the line of every value.

Refused, each as one UsageError naming the file and line: aliases (a cycle, or a billion laughs),
nesting deeper than MAX_DEPTH, a list or mapping as a key, a key given twice, explicit tags on
lists and mappings, and files over MAX_BYTES or not UTF-8.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from retool.errors import UsageError

#: a configuration file is a few kilobytes; these bound what a hostile or broken one can cost
MAX_BYTES = 1 << 20
MAX_DEPTH = 64


class Located:
    """Line numbers of every node, keyed by the path of keys/indices leading to it."""

    def __init__(self):
        self.lines: dict[tuple, int] = {}


def fmt_path(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


class _Refused(Exception):
    def __init__(self, mark, message: str):
        super().__init__(message)
        self.mark, self.message = mark, message


def _strict_loader(text: str, kind: str):
    """A SafeLoader that refuses aliases and nesting deeper than MAX_DEPTH while composing."""
    import yaml

    class Strict(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                ev = self.peek_event()
                raise _Refused(ev.start_mark, f"alias '*{ev.anchor}' is not allowed in a {kind}; write the value out")
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    raise _Refused(self.peek_event().start_mark,
                                   f"nested more than {MAX_DEPTH} levels deep; a {kind} needs a few")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return Strict(text)


def _construct(node, path: tuple, loc: Located, kind: str):
    import yaml

    loc.lines[path] = node.start_mark.line + 1
    plain = {yaml.MappingNode: "tag:yaml.org,2002:map", yaml.SequenceNode: "tag:yaml.org,2002:seq"}
    if type(node) in plain and node.tag != plain[type(node)]:
        raise _Refused(node.start_mark, f"{fmt_path(path)}: tag '{node.tag}' is not allowed in a {kind}; remove it")
    if isinstance(node, yaml.MappingNode):
        out = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                what = "list" if isinstance(k, yaml.SequenceNode) else "mapping"
                raise _Refused(k.start_mark, f"{fmt_path(path)}: a {what} cannot be a key; keys are names")
            key = k.value
            if key in out:
                raise _Refused(k.start_mark, f"{fmt_path(path + (key,))}: duplicate key '{key}' (first at line "
                                             f"{loc.lines[path + (key,)]}); keep one")
            out[key] = _construct(v, path + (key,), loc, kind)
            loc.lines[path + (key,)] = k.start_mark.line + 1  # the key's line, not its value's
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, path + (i,), loc, kind) for i, v in enumerate(node.value)]
    return _scalar(node)


def _scalar(node):
    import yaml

    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. '!!int abc'
        raise _Refused(node.start_mark, f"cannot read {node.value!r} as {node.tag} ({exc})") from None
    finally:
        loader.dispose()


def load(path, kind: str = "configuration file") -> tuple[Any, Located]:
    """(data, line numbers) of the YAML file at ``path``; data is None for an empty file.

    Mapping keys stay the text written (``1:`` is the key ``"1"``)."""
    import yaml

    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"{path}: {kind} not found") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read {kind} ({exc.strerror})") from None
    if len(raw) > MAX_BYTES:
        raise UsageError(f"{path}: {kind} is larger than {MAX_BYTES // 1024} KiB; is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save the file as UTF-8") from None
    loader = _strict_loader(text, kind)
    loc = Located()
    try:
        node = loader.get_single_node()
        return (None if node is None else _construct(node, (), loc, kind)), loc
    except _Refused as exc:
        raise UsageError(f"{path}:{exc.mark.line + 1}: {exc.message}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UsageError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    finally:
        loader.dispose()
