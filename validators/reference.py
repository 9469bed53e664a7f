"""The reference a candidate is judged against: another ONNX file, or a source model.

A source model is loaded by the same converters ``convert`` uses, so a
reference can be anything ``retool convert`` accepts (TorchScript, a
``module:factory``, a SavedModel, a Caffe prototxt ...). Its framework's
intra-op threads are pinned to the same count as the candidate's.
"""
from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from retool.errors import UsageError, first_line
from retool.types import TensorSpec

#: one-line error text; this module keeps its own length limit
_first_line = partial(first_line, limit=300)


class Reference:
    """Runs the reference model; ``outputs`` are in the candidate's output order."""

    kind = ""  # "onnx" or the source framework
    label = ""
    size_bytes: int | None = None
    versions: Mapping[str, str] = {}
    notes: tuple[str, ...] = ()

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def runner(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
        """A zero-argument callable that runs one batch, with all input preparation done up front."""
        return lambda: self.run(feeds)

    def input_ranges(self) -> dict[str, tuple[int, int]]:
        """Value ranges the reference itself fixes for integer inputs (a Hugging Face config's sizes)."""
        return {}

    def describe(self) -> dict:
        return {"kind": self.kind, "label": self.label, "size_bytes": self.size_bytes,
                "versions": dict(self.versions), "notes": list(self.notes)}

    def close(self) -> None:
        pass


class OnnxReference(Reference):
    kind = "onnx"

    def __init__(self, path: Path, candidate_outputs: Sequence[str], threads: int, providers=None):
        from retool.deps import version_of
        from retool.fsutil import external_data_files, file_size
        from retool.fsutil import load_onnx_header
        from retool.onnx_info import io_specs
        from retool.runtime import make_session

        ins, outs = io_specs(load_onnx_header(path))
        self.label = str(path)
        self.path = path
        self.size_bytes = file_size(path, external_data_files(path))
        self.versions = {"onnxruntime": version_of("onnxruntime") or ""}
        try:
            self.sess = make_session(path, threads=threads, providers=providers)
        except Exception as exc:
            raise UsageError(f"{path}: the reference ONNX model does not load in onnxruntime "
                             f"({_first_line(exc)}); give a reference that runs") from None
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.input_dtypes = {i.name: _ORT_FLOATS.get(i.type) for i in self.sess.get_inputs()}
        names = [o.name for o in outs]
        # Match outputs by name when both models name them alike, else by position.
        self.order = [names.index(n) for n in candidate_outputs] if set(candidate_outputs) <= set(names) else None
        self.ref_specs = ins

    def _feeds(self, feeds):
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise UsageError(f"{self.path}: the reference needs inputs {missing} that the candidate does not "
                             f"have (candidate inputs: {sorted(feeds)}); give a reference with the same inputs")
        return {n: _as_float(feeds[n], self.input_dtypes.get(n)) for n in self.input_names}

    def run(self, feeds):
        outs = self.sess.run(None, self._feeds(feeds))
        return [outs[i] for i in self.order] if self.order is not None else outs

    def runner(self, feeds):
        prepared, sess = self._feeds(feeds), self.sess
        return lambda: sess.run(None, prepared)


class SourceReference(Reference):
    """A source-framework model, run eagerly (torch eager, TF/Keras, OpenCV dnn for Caffe)."""

    def __init__(self, model, framework: str, label: str, restore: Callable[[], None], notes: Sequence[str]):
        self.model = model
        self.kind = framework
        self.label = label
        self.versions = dict(getattr(model, "versions", {}) or {})
        files = [Path(f) for f in getattr(model, "source_files", ()) if f and Path(f).exists()]
        self.size_bytes = sum(_path_size(f) for f in files) if files else None
        self._restore = restore
        self.notes = tuple(notes)

    def input_ranges(self):
        get = getattr(self.model, "input_ranges", None)
        return dict(get()) if callable(get) else {}

    def _feeds(self, feeds):
        dtypes = {s.name: s.dtype for s in getattr(self.model, "input_specs", ())}
        return self.model.reference_feeds({k: _as_float(v, dtypes.get(k)) for k, v in feeds.items()})

    def run(self, feeds):
        return self.model.run(self._feeds(feeds))

    def runner(self, feeds):
        prepared, model = self._feeds(feeds), self.model
        return lambda: model.run(prepared)

    def close(self):
        try:
            self.model.close()
        finally:
            self._restore()


def open_reference(source: Any, *, candidate_inputs: Sequence[TensorSpec], candidate_outputs: Sequence[str],
                   threads: int, framework: str = "auto", inputs: Sequence[TensorSpec] = (),
                   example_inputs: Mapping[str, np.ndarray] | None = None, trust_remote_code: bool = False,
                   weights=None, options: Mapping[str, Any] | None = None, seed: int = 0,
                   providers=None) -> Reference:
    """Open ``source`` as a Reference whose framework runs with ``threads`` intra-op threads."""
    from retool.converter.base import ConvertRequest
    from retool.converter.core import detect_framework
    from retool.registry import CONVERTERS

    fw = detect_framework(source, framework)
    if fw == "onnx":
        return OnnxReference(Path(source), candidate_outputs, threads, providers)
    restore, notes = _pin_threads(fw, threads)
    try:
        converter = CONVERTERS.get(fw)
        base = ConvertRequest(source, Path("reference.onnx"), fw, Path(weights) if weights else None,
                              tuple(inputs), dict(example_inputs) if example_inputs is not None else None,
                              None, trust_remote_code, dict(options or {}), seed)
        try:
            model = converter.load(base)
        except UsageError:
            if inputs or example_inputs is not None or not candidate_inputs:
                raise
            # A source that does not declare its inputs: take them from the candidate it was exported to.
            import dataclasses

            model = converter.load(dataclasses.replace(base, inputs=tuple(candidate_inputs)))
    except BaseException:
        restore()
        raise
    label = str(source) if isinstance(source, (str, Path)) else type(source).__name__
    return SourceReference(model, fw, label, restore, notes)


def _pin_threads(framework: str, threads: int) -> tuple[Callable[[], None], list[str]]:
    """Set the source framework's intra-op threads; returns (undo, notes)."""
    notes: list[str] = []
    fw = framework.lower()
    if fw == "torch":
        from retool.deps import require

        torch = require("torch", "torch", "run the PyTorch reference")
        before = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        notes.append(f"torch.set_num_threads({threads})")
        return (lambda: torch.set_num_threads(before)), notes
    if fw in ("tensorflow", "keras", "tf", "tflite"):
        from retool.deps import require

        tf = require("tensorflow", "tensorflow", "run the TensorFlow reference")
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(1)
            notes.append(f"tf intra-op threads {threads}, inter-op 1")
        except RuntimeError:  # TF already initialised in this process: its thread pools are fixed
            notes.append(f"tensorflow was already initialised; its threads ({tf.config.threading.get_intra_op_parallelism_threads() or 'default'}) could not be set to {threads}")
        return (lambda: None), notes
    if fw in ("caffe", "opencv"):
        with contextlib.suppress(ImportError):
            import cv2

            before = cv2.getNumThreads()
            cv2.setNumThreads(int(threads))
            notes.append(f"cv2.setNumThreads({threads})")
            return (lambda: cv2.setNumThreads(before)), notes
    notes.append(f"threads of the {framework} reference are not pinned")
    return (lambda: None), notes


_ORT_FLOATS = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


def _as_float(a: np.ndarray, dtype: str | None) -> np.ndarray:
    """An fp16-I/O candidate's inputs, cast for an fp32 reference (and back); other dtypes untouched."""
    if dtype in ("float32", "float16", "float64") and a.dtype.kind == "f" and a.dtype != np.dtype(dtype):
        return a.astype(dtype)
    return a


def _path_size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size
