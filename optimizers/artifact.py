"""Files of an optimisation: put a staged model in place, set its metadata, load it safely, list float nodes."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


def load_in_subprocess(path, level: str = "all", timeout: float = 300) -> tuple[bool, str]:
    """Create an ORT CPU session in a child process, so a crash in ORT cannot take us down."""
    import subprocess
    import sys

    code = ("import sys; from retool.runtime import make_session; make_session(sys.argv[1], level=sys.argv[2])")
    try:
        r = subprocess.run([sys.executable, "-c", code, str(path), level], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timed out"
    if r.returncode == 0:
        return True, ""
    tail = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
    return False, tail[:200] if r.returncode > 0 else f"crashed with signal {-r.returncode}"


def float_nodes(path) -> list[str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    skip = {"Shape", "Reshape", "Concat", "Gather", "Unsqueeze", "Squeeze", "Slice", "Cast", "Constant",
            "Identity", "Transpose", "Flatten"}
    return [n.name for n in m.graph.node if n.name and n.op_type not in skip]


def finalize(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst``; external data is rewritten to ``<dst name>.data`` beside it."""
    import onnx

    from retool.fsutil import external_data_files

    if external_data_files(src):
        m = onnx.load(str(src))  # one copy, needed to rewrite the data file name
        onnx.save(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=dst.name + ".data", size_threshold=1024)
    else:
        os.replace(src, dst)


def set_metadata(path, props: Mapping[str, str]) -> None:
    """Set model-level metadata_props in place (external data stays where it is)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    keep = [p for p in m.metadata_props if p.key not in props]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))


def external_names(path) -> tuple[str, ...]:
    from retool.fsutil import external_data_files

    return external_data_files(path)


def load_input(model):
    from retool.errors import UsageError
    from retool.fsutil import load_onnx_header
    from retool.onnx_info import artifact_from_onnx
    from retool.types import ModelArtifact

    if isinstance(model, ModelArtifact):
        if model.format != "onnx":
            raise UsageError(f"{model.path}: optimize takes an ONNX model, this artifact is {model.format}; "
                             f"convert it first with 'retool convert'")
        path = model.path
    else:
        path = Path(model)
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; optimize takes an ONNX file (convert a saved model with 'retool convert')")
    header = load_onnx_header(path)
    if not header.ir_version or not header.graph.node:
        raise UsageError(f"{path}: not an ONNX model (no graph found); convert it first with 'retool convert'")
    return model if isinstance(model, ModelArtifact) else artifact_from_onnx(path)
