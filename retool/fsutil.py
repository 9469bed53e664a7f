"""File helpers: hashing and atomic writes (write to a temp name, then rename)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from retool.errors import UnsafePath, UsageError

_CHUNK = 1 << 20
#: sha256_file's read size: few reads, so a thread importing beside it (verify's) rarely delays the next one
_HASH_CHUNK = 16 << 20


def sha256_file(path) -> str:
    h = hashlib.sha256()
    p = Path(path)
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode())
            h.update(bytes.fromhex(sha256_file(f)))
        return h.hexdigest()
    buf = bytearray(min(_HASH_CHUNK, max(p.stat().st_size, 1)))
    view = memoryview(buf)
    with open(p, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])  # hashlib and readinto both release the GIL
    return h.hexdigest()


#: from this many bytes on, sha256_files hashes in a child process (its start costs about 30 ms)
CHILD_HASH_MIN_BYTES = 256 << 20
#: the child's script (also bench's hash-once baseline): each file's sha256 on a line, in order
HASH_SCRIPT = """
import hashlib, sys
buf = bytearray(%d)
view = memoryview(buf)
for f in sys.argv[1:]:
    h = hashlib.sha256()
    with open(f, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    print(h.hexdigest(), flush=True)
""" % _HASH_CHUNK


def sha256_files(paths: list) -> list[str]:
    """``sha256_file`` of each path, in order. Large files are hashed in a child Python (``hash_early``): a
    caller importing in another thread meanwhile (verify loads model-signing, about 1.3 s, whose C extensions'
    start-ups hold the GIL) would otherwise stall every read; measured +0.4-0.9 s on 1.5 GB. What the child
    cannot hash is hashed here, so errors surface as they would without it. Files an earlier ``hash_early``
    started are taken from there when unchanged since (size and mtime)."""
    paths = [Path(p) for p in paths]
    early = {p: _early(p) for p in paths}
    hash_early([p for p in paths if early[p] is None])
    return [early[p] or _early(p) or sha256_file(p) for p in paths]


#: str(path) -> (size, mtime_ns, job, index) of files a child started hashing (``hash_early``)
_EARLY: dict = {}


def hash_early(paths) -> None:
    """Start hashing the regular files in ``paths`` in a child now (from CHILD_HASH_MIN_BYTES in all), so the
    bytes are read while the caller imports; ``sha256_files`` takes each result once, if the file's size and
    mtime are unchanged. Paths must already be what the caller will ask for (``inside`` made them)."""
    import subprocess
    import sys

    files = []
    for p in paths:
        try:
            st = os.stat(p, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            files.append((str(p), st))
    if sum(st.st_size for _, st in files) < CHILD_HASH_MIN_BYTES:
        return
    from retool.procs import die_with_parent

    try:  # a child that dies with retool, like every process retool starts
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", HASH_SCRIPT, *(f for f, _ in files)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                preexec_fn=die_with_parent())
    except OSError:
        return
    job: dict = {"proc": proc, "n": len(files), "out": None}
    for i, (f, st) in enumerate(files):
        _EARLY[f] = (st.st_size, st.st_mtime_ns, job, i)


def end_early() -> None:
    """Forget what ``hash_early`` started and nobody asked for (stopping its child if still running)."""
    for _, _, job, _ in list(_EARLY.values()):
        if job["out"] is None:
            job["out"] = []
            job["proc"].kill()
            job["proc"].communicate()
    _EARLY.clear()


def _early(p: Path) -> str | None:
    entry = _EARLY.pop(str(p), None)
    if entry is None:
        return None
    size, mtime, job, i = entry
    if job["out"] is None:
        out, _ = job["proc"].communicate()
        out = out.split()
        job["out"] = out if job["proc"].returncode == 0 and len(out) == job["n"] else []
    try:
        st = os.stat(p, follow_symlinks=False)
    except OSError:
        return None
    if (st.st_size, st.st_mtime_ns) != (size, mtime) or i >= len(job["out"]):
        return None
    return job["out"][i]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safe_key(key: str, *, where: str = "", allow_root: bool = False) -> str:
    """``key`` as a '/'-joined relative name, or UnsafePath: no absolute part, empty segment, '.', '..',
    backslash or NUL. The lexical half of :func:`inside`; object-store keys have no file system to resolve."""
    text = str(key)
    if text == "" and allow_root:
        return text
    segs = text.split("/")
    why = ("is absolute" if text.startswith("/") else
           "has an empty segment ('//' or a trailing '/')" if "" in segs else
           "has a '.' or '..' segment" if any(s in (".", "..") for s in segs) else
           "has a backslash or NUL" if ("\\" in text or "\x00" in text) else "")
    if why:
        raise UnsafePath(f"{where or 'repository'}: refused the entry {text!r}: it {why}, so it could name a file "
                         f"outside the repository; remove it (retool never writes such names)")
    return text


def inside(root, rel: str, *, where: str = "", allow_root: bool = True) -> Path:
    """The one way a path is made from repository content (a bucket key, a manifest's file list, a model
    name): ``root / rel`` resolved, refused (UnsafePath) unless it stays under ``root``, symlinks included."""
    base = Path(root).resolve()
    key = safe_key(rel, where=where or str(base), allow_root=allow_root)
    if not key:
        return base
    p = base.joinpath(*key.split("/"))
    real = p.resolve()
    if real != base and base not in real.parents:
        raise UnsafePath(f"{where or base}: refused the entry {key!r}: it resolves to {real}, outside {base} "
                         f"(a symlink that leaves the repository); remove the link")
    return p


def _refuse_special(p: Path) -> None:
    """A device, FIFO or socket at the output is never replaced (``-o /dev/null`` as root would break the
    system); a symlink is judged by what it points at."""
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:  # ELOOP, EACCES: cannot tell what it is, so do not write there
        raise UsageError(f"{p}: cannot inspect the output ({exc.strerror or exc}); choose another -o") from None
    if not stat.S_ISREG(mode):
        what = ("a directory" if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise UsageError(f"{p}: the output exists and is {what}, not a regular file; retool never replaces it; "
                         f"choose a file name such as model.onnx")


def check_output_path(path) -> Path:
    """Fail early, before expensive work, if ``path`` cannot be written."""
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UsageError(f"{p}: output path is a directory; give a file name such as {p / 'model.onnx'}")
    if not parent.exists():
        raise UsageError(f"{p}: output folder {parent} does not exist; create it or choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{p}: output folder {parent} is not writable; choose another -o")
    _refuse_special(p)
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{p}: output file exists and is not writable; choose another -o")
    if not p.suffix and not p.exists():
        raise UsageError(f"{p}: output has no file extension, so it looks like a folder; give a file name such "
                         f"as {p / 'model.onnx'} (create the folder first) or {p.with_suffix('.onnx')}")
    try:  # os.access says yes to root everywhere, /proc included: try it
        fd, probe = tempfile.mkstemp(prefix=".retool-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{p}: cannot write in {parent} ({exc.strerror or exc}); choose another -o") from None
    return p


@contextlib.contextmanager
def staging_dir(near) -> Iterator[Path]:
    """A temporary folder beside ``near`` (same file system, so rename is atomic)."""
    parent = Path(near).expanduser().resolve().parent
    try:
        d = Path(tempfile.mkdtemp(prefix=".retool-tmp-", dir=parent))
    except OSError as exc:  # a file system problem at the output is bad input, not a bug
        raise UsageError(f"{near}: cannot write in {parent} ({exc.strerror or exc}); choose another output") from None
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def atomic_write_text(path, text: str) -> None:
    p = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as exc:
        raise UsageError(f"{p}: cannot write in {p.parent} ({exc.strerror or exc}); choose another output") from None
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, p)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # disk full, quota, a read-only remount: one usage line
            raise UsageError(f"{p}: could not be written ({exc.strerror or exc}); free space or choose another "
                             f"output") from None
        raise


def move_onnx(src: Path, dst: Path) -> tuple[str, ...]:
    """Move an ONNX file and its external data files into place, data first.

    The model file is renamed last so that a visible ``dst`` is always complete.
    Returns the external data file names (relative to dst's folder).
    """
    src, dst = Path(src), Path(dst)
    extra = external_data_files(src)
    _refuse_special(dst)  # checked again here: the output may have changed during the work
    for name in extra:
        _refuse_special(inside(dst.parent, name, allow_root=False))
    try:
        for name in extra:  # names come from the model file: content, so kept inside both folders
            os.replace(inside(src.parent, name, allow_root=False), inside(dst.parent, name, allow_root=False))
        os.replace(src, dst)
    except OSError as exc:
        raise UsageError(f"{dst}: could not be written ({exc.strerror or exc}); choose another output") from None
    return extra


def load_onnx_header(path):
    """The ONNX graph without its external weights; one UsageError when the file is missing or unreadable."""
    import onnx

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: model file not found")
    try:
        return onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise UsageError(f"{p}: not a readable ONNX model ({type(exc).__name__}); "
                         f"convert it first with 'retool convert'") from None


def external_data_files(model_path) -> tuple[str, ...]:
    """Names of external-data files an ONNX model refers to (without loading weights)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    names: set[str] = set()
    for t in _all_initializers(m.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for kv in t.external_data:
                if kv.key == "location":
                    names.add(kv.value)
    return tuple(sorted(names))


def all_graphs(graph):
    """``graph`` and every subgraph inside it (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.g.ByteSize():
                yield from all_graphs(attr.g)
            for g in attr.graphs:
                yield from all_graphs(g)


def _all_initializers(graph):
    for g in all_graphs(graph):
        yield from g.initializer


def file_size(path, extra: tuple[str, ...] = ()) -> int:
    p = Path(path)
    return p.stat().st_size + sum((p.parent / e).stat().st_size for e in extra if (p.parent / e).exists())
