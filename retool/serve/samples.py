"""The samples file published in each version: held-out inputs and the outputs they must give.

``samples.npz`` holds ``in/<input>``, ``out/<output>`` (the published model run by onnxruntime at
publish time) and, when a reference model is known (the fp32 or source model), ``ref/<output>``.
``retool repo check`` sends the inputs through a real Triton and compares: the server must give
``out`` (the serving stack adds no error), and its distance to ``ref`` is reported.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

import numpy as np

from retool.inputs import SAMPLES_SEED

SAMPLES_FILE = "samples.npz"
MAX_ROWS = 8


def _specs(model_path: Path):
    from retool.onnx_info import artifact_from_onnx

    art = artifact_from_onnx(model_path)
    return art.inputs, art.outputs


def build(model_path, rows: int, reference=None, seed: int = SAMPLES_SEED, report: dict | None = None
          ) -> tuple[bytes, dict]:
    """(npz bytes, manifest entry). ``rows`` is the batch (max_batch_size, at most MAX_ROWS; 0 = no batch axis).
    A decoder with a KV cache stores greedy generations instead (retool/serve/decoder.py); ``report``
    (its validate report as a dict) gives its generation gate and, without ``reference``, its reference."""
    import onnxruntime as ort

    from retool.inputs import random_feeds

    model_path = Path(model_path)
    ins, outs = _specs(model_path)
    from retool.validators.generation import is_decoder_graph
    from retool.validators.seq2seq_generation import is_seq2seq_decoder_graph

    if is_seq2seq_decoder_graph([s.name for s in ins]):  # greedy tokens with its encoder (retool/serve/seq2seq.py)
        from retool.serve import seq2seq

        arrays, gen = seq2seq.build(model_path, seed)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue(), {"file": SAMPLES_FILE, "rows": 1, "batched": False, "seed": seed, "inputs": [],
                                "outputs": [], **gen}
    if is_decoder_graph([s.name for s in ins]):
        from retool.serve import decoder

        arrays, gen = decoder.build(model_path, reference, report, seed)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue(), {"file": SAMPLES_FILE, "rows": 1, "batched": False, "seed": seed, "inputs": [],
                                "outputs": [], **gen}
    n = max(1, min(int(rows or 1), MAX_ROWS))
    feeds = random_feeds(ins, batch=n, seed=seed)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in outs]
    got = dict(zip(names, sess.run(names, feeds)))
    arrays = {f"in/{k}": v for k, v in feeds.items()}
    arrays.update({f"out/{k}": np.asarray(v) for k, v in got.items()})
    entry = {"file": SAMPLES_FILE, "rows": n if int(rows or 0) > 0 else 1, "batched": int(rows or 0) > 0,
             "seed": seed, "inputs": list(feeds), "outputs": names,
             "expected": "the published model.onnx run by onnxruntime at publish time"}
    if reference is not None and Path(reference).is_file() and Path(reference).resolve() != model_path.resolve():
        try:
            rsess = ort.InferenceSession(str(reference), so, providers=["CPUExecutionProvider"])
            rnames = [o.name for o in rsess.get_outputs()]
            rfeeds = {i.name: feeds[i.name] for i in rsess.get_inputs() if i.name in feeds}
            if len(rfeeds) == len(rsess.get_inputs()) and set(names) <= set(rnames):
                ref = dict(zip(rnames, rsess.run(rnames, rfeeds)))
                arrays.update({f"ref/{k}": np.asarray(ref[k]) for k in names})
                entry["reference"] = f"{Path(reference).name} (the model it was optimised from)"
        except Exception as exc:  # a reference that does not run is noted, never fatal for publish
            entry["reference_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue(), entry


def load(data: bytes) -> dict[str, dict[str, np.ndarray]]:
    """{"in": {...}, "out": {...}, "ref": {...}} from the npz bytes."""
    out: dict[str, dict[str, np.ndarray]] = {"in": {}, "out": {}, "ref": {}}
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        for k in z.files:
            kind, _, name = k.partition("/")
            if kind in out:
                out[kind][name] = np.asarray(z[k])
    return out


def read_published(repo, name: str, version: int, entry: Mapping | None = None, split: bool = True) -> dict:
    """The samples stored in a published version, loaded; a missing or damaged file is one line, exit 7.

    ``split``: {"in", "out", "ref"} as :func:`load` gives; else the npz's arrays by key."""
    from retool.errors import PublishError

    key = f"{name}/{version}/{(entry or {}).get('file') or SAMPLES_FILE}"
    where = repo.storage.location(key)
    fix = "republish this version, or run retool repo verify to see what else changed"
    try:
        data = repo.storage.read_bytes(key)
    except FileNotFoundError:
        raise PublishError(f"{where}: the manifest lists this samples file but it is missing; {fix}") from None
    except OSError as exc:
        raise PublishError(f"{where}: cannot read the samples file ({exc.strerror or exc}); {fix}") from None
    try:
        if split:
            return load(data)
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except Exception as exc:  # np.load: BadZipFile, ValueError, EOFError, OSError ... on a damaged file
        raise PublishError(f"{where}: damaged samples file ({type(exc).__name__}: {str(exc)[:120]}); {fix}") from None


def compare(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], atol: float = 1e-4,
            rtol: float = 1e-3) -> dict:
    """Max abs difference, min cosine and pass/fail (allclose) over the outputs both sides have."""
    worst, cos_min, ok = 0.0, 1.0, True
    for k, w in want.items():
        g = got.get(k)
        if g is None or np.shape(g) != np.shape(w):
            return {"passed": False, "max_abs": None, "min_cosine": None,
                    "detail": f"output {k}: shape {None if g is None else list(np.shape(g))}, expected {list(np.shape(w))}"}
        g64, w64 = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if g64.size:
            worst = max(worst, float(np.max(np.abs(g64 - w64))))
            den = float(np.linalg.norm(g64) * np.linalg.norm(w64))
            cos = float(np.dot(g64.ravel(), w64.ravel()) / den) if den else float(np.array_equal(g64, w64))
            cos_min = min(cos_min, cos)
        if np.isfinite(atol) and np.isfinite(rtol):  # an infinite tolerance (figures only) passes; numpy would warn
            ok = ok and bool(np.allclose(g64, w64, atol=atol, rtol=rtol))
    return {"passed": ok, "max_abs": worst, "min_cosine": cos_min}


def intra_op_hint(model_path) -> int | None:
    """An optimiser's measured best thread count: ONNX metadata_props key ``retool.intra_op_threads``."""
    import onnx

    try:
        m = onnx.load(str(model_path), load_external_data=False)
    except Exception:
        return None
    for p in m.metadata_props:
        if p.key == "retool.intra_op_threads":
            try:
                v = int(str(p.value).strip())
            except ValueError:
                return None
            return v if v > 0 else None
    return None
