"""Calibration data: an .npz, a folder of .npy/.npz, or a folder of images.

Samples are read lazily, one file at a time, so a large folder never sits in
memory whole (a single .npz is read whole: use a folder for big sets). Without
data, seeded random samples stand in, loudly, and the report says so.

Each sample is a dict of arrays with a batch axis of 1 (or the model's static
batch). The last ~20 % of samples are held apart for the parity check.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from retool.errors import UsageError
from retool.types import TensorSpec

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
#: Random stand-ins when no calibration data is given.
RANDOM_CALIBRATION_SAMPLES = 16
RANDOM_HELDOUT_SAMPLES = 16
#: Held-out share of real data, and caps on what is used.
HELDOUT_FRACTION = 0.2
MAX_HELDOUT = 32
#: An accuracy goal holds out the rows it needs (validators.bounds.rows_needed), but never more than
#: this share of the real samples given, nor more than this many random ones.
GOAL_HELDOUT_SHARE = 0.5
MAX_GOAL_RANDOM_HELDOUT = 512
MAX_CALIBRATION = 512


@dataclass(frozen=True)
class Preprocess:
    """How images become an input tensor: ``resize=H,W;mean=..;std=..;layout=nchw;scale=0.00392;color=rgb``."""

    size: tuple[int, int] | None = None  # (H, W); None = from the model's input shape
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0  # applied to pixel values before mean/std
    layout: str | None = None  # nchw | nhwc; None = guessed from the model input
    color: str = "rgb"  # rgb | bgr | gray

    @classmethod
    def parse(cls, text: str | None) -> "Preprocess":
        if not text:
            return cls()
        kw: dict = {}
        for part in text.replace(" ", "").split(";"):
            if not part:
                continue
            key, _, val = part.partition("=")
            try:
                if key == "resize":
                    dims = [int(v) for v in val.replace("x", ",").split(",")]
                    kw["size"] = (dims[0], dims[-1])
                elif key in ("mean", "std"):
                    kw[key] = tuple(float(v) for v in val.split(","))
                elif key == "scale":
                    num, _, den = val.partition("/")
                    kw["scale"] = float(num) / float(den or 1)
                elif key in ("layout", "color"):
                    kw[key] = val.lower()
                else:
                    raise ValueError(f"unknown key {key!r}")
            except (ValueError, IndexError, SyntaxError, ZeroDivisionError) as exc:
                raise UsageError(f"--preprocess {text!r}: {exc}; expected e.g. "
                                 f"'resize=224,224;mean=0.485,0.456,0.406;std=0.229,0.224,0.225;layout=nchw'") from None
        if kw.get("layout") not in (None, "nchw", "nhwc"):
            raise UsageError(f"--preprocess {text!r}: layout must be nchw or nhwc")
        if kw.get("color") not in (None, "rgb", "bgr", "gray"):
            raise UsageError(f"--preprocess {text!r}: color must be rgb, bgr or gray")
        return cls(**kw)

    def to_dict(self) -> dict:
        return {"size": list(self.size) if self.size else None, "mean": list(self.mean), "std": list(self.std),
                "scale": self.scale, "layout": self.layout, "color": self.color}


@dataclass
class CalibrationData:
    """Where samples come from, plus the split into calibration and held-out samples."""

    source: str
    kind: str  # npz | folder | images | random
    specs: tuple[TensorSpec, ...]
    #: One loader per item (a file, or a row of an .npz); each returns a list of samples.
    items: list[Callable[[], list[dict[str, np.ndarray]]]]
    heldout_items: list[Callable[[], list[dict[str, np.ndarray]]]]
    random: bool = False
    digest: str = ""
    warnings: list[str] = field(default_factory=list)
    preprocess: Preprocess | None = None
    #: items (files or .npz rows) the user gave, and why some are not used for calibration
    given: int = 0
    dropped: list[str] = field(default_factory=list)

    def calibration_samples(self) -> Iterator[dict[str, np.ndarray]]:
        for load in self.items:
            for s in load():
                yield check_sample(s, self.specs, self.source)

    def heldout_samples(self) -> list[dict[str, np.ndarray]]:
        out = []
        for load in self.heldout_items:
            out.extend(check_sample(s, self.specs, self.source) for s in load())
        return out

    @property
    def count(self) -> int:
        return len(self.items)

    def summary(self, method: str, samples: int) -> dict:
        d = {"source": self.source, "kind": self.kind, "samples": samples, "heldout_items": len(self.heldout_items),
             "given_items": self.given or len(self.items) + len(self.heldout_items), "dropped": list(self.dropped),
             "method": method, "digest": self.digest, "random": self.random}
        if self.preprocess is not None:
            d["preprocess"] = self.preprocess.to_dict()
        return d


class StreamingReader:
    """An onnxruntime CalibrationDataReader over at most ``limit`` samples of an iterator."""

    def __init__(self, samples: Iterator[dict[str, np.ndarray]], limit: int | None = None,
                 on_sample: Callable[[int], None] | None = None):
        self._it = samples
        self._limit = limit
        self._n = 0
        self._on_sample = on_sample
        self.exhausted = False

    def get_next(self):
        if self._limit is not None and self._n >= self._limit:
            return None
        try:
            s = next(self._it)
        except StopIteration:
            self.exhausted = True
            return None
        self._n += 1
        if self._on_sample:
            self._on_sample(self._n)
        return s

    @property
    def count(self) -> int:
        return self._n


def open_calibration(source, specs: Sequence[TensorSpec], seed: int = 0,
                     preprocess: str | Preprocess | None = None, max_samples: int | None = None,
                     heldout: int | None = None, goal_heldout: int = 0) -> CalibrationData:
    """Validate ``source`` against the model inputs and index its samples (nothing big is read yet).

    ``max_samples`` caps the calibration items (default MAX_CALIBRATION); the cut is reported.
    ``heldout``: exactly this many items held out (``--heldout``); ``goal_heldout``: the rows an
    accuracy goal needs, held out when the data allows (at most GOAL_HELDOUT_SHARE of it)."""
    if max_samples is not None and int(max_samples) < 1:
        raise UsageError(f"--calibration-samples {max_samples}: give at least 1")
    if heldout is not None and int(heldout) < 1:
        raise UsageError(f"--heldout {heldout}: give at least 1")
    split = _Held(int(heldout) if heldout else None, int(goal_heldout or 0))
    data = _open(source, tuple(specs), seed, preprocess, int(max_samples) if max_samples else None, split)
    return data


@dataclass(frozen=True)
class _Held:
    """How many items are held out: exactly ``given``, or at least ``goal`` where the data allows."""

    given: int | None = None
    goal: int = 0

    def count(self, n: int, where) -> int:
        if self.given is not None:
            if self.given > n - 1:
                raise UsageError(f"--heldout {self.given}: {where} holds {n} sample(s); hold out at most {n - 1} "
                                 f"(one at least is left for calibration), or give more samples")
            return self.given
        k = min(MAX_HELDOUT, max(1, int(round(n * HELDOUT_FRACTION))))
        return max(k, min(self.goal, int(n * GOAL_HELDOUT_SHARE)))

    def random_count(self) -> int:
        if self.given is not None:
            return self.given
        return max(RANDOM_HELDOUT_SAMPLES, min(self.goal, MAX_GOAL_RANDOM_HELDOUT))


def short_count_warning(data: CalibrationData, used: int) -> str | None:
    """A loud line when calibration used fewer samples than the user gave (beyond the held-out share)."""
    if data.random:
        return None
    given = data.given or (len(data.items) + len(data.heldout_items))
    held = len(data.heldout_items)
    if used + held >= given and not data.dropped:
        return None
    why = "; ".join(data.dropped) or f"{given - held - used} item(s) yielded no sample"
    return (f"CALIBRATION USED ONLY {used} OF {given} SAMPLES GIVEN ({held} held out for the parity check; {why}); "
            f"ranges from fewer samples may not cover real inputs")


def _open(source, specs, seed, preprocess, cap, held: _Held | None = None) -> CalibrationData:
    held = held or _Held()
    pre = preprocess if isinstance(preprocess, Preprocess) else Preprocess.parse(preprocess) if preprocess else None
    if source is None:
        return _random(specs, seed, held.random_count())
    p = Path(source).expanduser()
    if not p.exists():
        raise UsageError(f"{p}: calibration data not found; give an .npz, a folder of .npy/.npz files or of images")
    if p.is_file():
        if p.suffix.lower() != ".npz":
            raise UsageError(f"{p}: calibration data must be an .npz (one array per input) or a folder; "
                             f"save it with numpy.savez(path, {', '.join(s.name + '=...' for s in specs)})")
        return _npz(p, specs, cap, held)
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    arrays = [f for f in files if f.suffix.lower() in (".npy", ".npz")]
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTS]
    if not arrays and not images:
        raise UsageError(f"{p}: calibration folder has no .npy, .npz or image files; add samples "
                         f"or leave out --calibration to use random data")
    if arrays and images:
        raise UsageError(f"{p}: calibration folder mixes arrays and images; keep one kind per folder")
    if arrays:
        return _array_folder(p, arrays, specs, cap, held)
    return _image_folder(p, images, specs, pre or Preprocess(), cap, held)


def _split(items: list, cap: int | None, dropped: list[str], held: _Held | None = None,
           where="the calibration data") -> tuple[list, list, list[str]]:
    n = len(items)
    warnings = []
    user_cap, cap = cap, cap or MAX_CALIBRATION
    held = held or _Held()
    if n < 2:
        if held.given:
            held.count(n, where)  # raises: nothing can be held out of one sample
        warnings.append("only one calibration sample: parity is checked on seeded random data instead of held-out samples")
        return items, [], warnings
    k = held.count(n, where)
    calib, heldout = items[:n - k], items[n - k:]
    if len(calib) > cap:
        msg = f"using the first {cap} of {len(calib)} calibration samples"
        warnings.append(msg)
        dropped.append(msg + ("" if user_cap else " (the default cap; raise it with --calibration-samples)"))
        calib = calib[:cap]
    return calib, heldout, warnings


def _random(specs, seed: int, heldout: int = RANDOM_HELDOUT_SAMPLES) -> CalibrationData:
    from retool.inputs import random_feeds

    def loader(i):
        return lambda: [random_feeds(specs, batch=_batch(specs), seed=seed + 1000 + i)]

    calib = [loader(i) for i in range(RANDOM_CALIBRATION_SAMPLES)]
    held = [loader(RANDOM_CALIBRATION_SAMPLES + i) for i in range(heldout)]
    h = hashlib.sha256()
    for load in calib:
        for s in load():
            for k in sorted(s):
                h.update(k.encode())
                h.update(np.ascontiguousarray(s[k]).tobytes())
    warn = ("NO CALIBRATION DATA: quantization ranges come from seeded random inputs, which rarely look like "
            "real data; accuracy on real inputs is unknown. Pass --calibration with representative samples.")
    return CalibrationData(f"random(seed={seed})", "random", specs, calib, held, True, h.hexdigest(), [warn])


def _npz(p: Path, specs, cap=None, held=None) -> CalibrationData:
    from retool.inputs import load_npz

    arrays = load_npz(p)
    _check_names(set(arrays), specs, p)
    arrays = {s.name: _with_batch_axis(arrays[s.name], s, p) for s in specs}
    rows = {a.shape[0] for a in arrays.values()}
    if len(rows) != 1:
        raise UsageError(f"{p}: calibration arrays have different numbers of samples "
                         f"({', '.join(f'{k}: {v.shape[0]}' for k, v in arrays.items())}); give each input the same count")
    b = _batch(specs)
    n = rows.pop() // b
    if n == 0:
        raise UsageError(f"{p}: calibration data holds no complete sample (the model's batch is {b})")
    check_sample({k: v[:b] for k, v in arrays.items()}, specs, p)

    def loader(i):
        return lambda: [{k: v[i * b:(i + 1) * b] for k, v in arrays.items()}]

    items = [loader(i) for i in range(n)]
    dropped: list[str] = []
    rows_n = next(iter(arrays.values())).shape[0]
    if rows_n % b:
        dropped.append(f"{rows_n % b} row(s) left over, not a whole batch of {b}")
    calib, heldout, warnings = _split(items, cap, dropped, held, p)
    from retool.fsutil import sha256_file

    return CalibrationData(str(p), "npz", specs, calib, heldout, False, sha256_file(p), warnings,
                           given=-(-rows_n // b), dropped=dropped)


def _array_folder(p: Path, files: list[Path], specs, cap=None, held=None) -> CalibrationData:
    from retool.fsutil import sha256_file

    if any(f.suffix.lower() == ".npy" for f in files) and len(specs) != 1:
        raise UsageError(f"{p}: .npy files only work for single-input models; this model has inputs "
                         f"{', '.join(s.name for s in specs)}: save one .npz per sample with an array per input")

    def loader(f: Path):
        def load():
            if f.suffix.lower() == ".npy":
                arrays = {specs[0].name: np.load(f, allow_pickle=False)}
            else:
                with np.load(f, allow_pickle=False) as z:
                    arrays = {k: np.asarray(z[k]) for k in z.files}
                _check_names(set(arrays), specs, f)
            arrays = {s.name: _with_batch_axis(arrays[s.name], s, f) for s in specs}
            b = _batch(specs)
            n = min(a.shape[0] for a in arrays.values()) // b
            return [{k: v[i * b:(i + 1) * b] for k, v in arrays.items()} for i in range(max(n, 1))]
        return load

    items = [loader(f) for f in files]
    for s in items[0]()[:1]:  # fail fast on the first file: names, dtypes, shapes
        check_sample(s, specs, files[0])
    dropped: list[str] = []
    calib, heldout, warnings = _split(items, cap, dropped, held, p)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(bytes.fromhex(sha256_file(f)))
    return CalibrationData(str(p), "folder", specs, calib, heldout, False, h.hexdigest(), warnings,
                           given=len(items), dropped=dropped)


def _image_folder(p: Path, files: list[Path], specs, pre: Preprocess, cap=None, held=None) -> CalibrationData:
    from retool.deps import require
    from retool.fsutil import sha256_file

    image_specs = [s for s in specs if s.dtype.startswith("float") and len(s.shape) == 4]
    if len(specs) != 1 or not image_specs:
        raise UsageError(f"{p}: a folder of images calibrates a model with one 4-D float input; this model has "
                         f"{', '.join(str(s) for s in specs)}: give an .npz instead")
    spec = specs[0]
    layout = pre.layout or ("nchw" if spec.shape[1] in (1, 3) else "nhwc")
    c_axis = 1 if layout == "nchw" else 3
    h_axis, w_axis = (2, 3) if layout == "nchw" else (1, 2)
    size = pre.size or (spec.shape[h_axis], spec.shape[w_axis])
    if not all(isinstance(d, int) for d in size):
        raise UsageError(f"{p}: the model's image size is dynamic ({spec}); give --preprocess 'resize=H,W'")
    channels = spec.shape[c_axis] if isinstance(spec.shape[c_axis], int) else 3
    cv2 = require("cv2", "caffe", "read calibration images", package="opencv-python-headless")

    def loader(f: Path):
        def load():
            img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
            if img is None:
                raise UsageError(f"{f}: not a readable image; remove it from the calibration folder")
            img = cv2.resize(img, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)
            if img.ndim == 2:
                img = img[:, :, None]
            elif pre.color == "rgb":
                img = img[:, :, ::-1]
            x = img.astype(np.float32) * pre.scale
            x = (x - np.asarray(pre.mean[:channels], np.float32)) / np.asarray(pre.std[:channels], np.float32)
            if layout == "nchw":
                x = x.transpose(2, 0, 1)
            return [{spec.name: np.ascontiguousarray(x[None]).astype(spec.dtype)}]
        return load

    items = [loader(f) for f in files]
    dropped: list[str] = []
    calib, heldout, warnings = _split(items, cap, dropped, held, p)
    h = hashlib.sha256(repr(pre.to_dict()).encode())
    for f in files:
        h.update(f.name.encode())
        h.update(bytes.fromhex(sha256_file(f)))
    data = CalibrationData(str(p), "images", specs, calib, heldout, False, h.hexdigest(), warnings, pre,
                           given=len(items), dropped=dropped)
    data.preprocess = Preprocess(tuple(size), pre.mean, pre.std, pre.scale, layout, pre.color)
    return data


def _batch(specs) -> int:
    b = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    return b.pop() if len(b) == 1 else 1


def _check_names(names: set, specs, where) -> None:
    want = {s.name for s in specs}
    if names != want:
        missing, extra = sorted(want - names), sorted(names - want)
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"] if extra else [])
        raise UsageError(f"{where}: calibration arrays do not match the model inputs ({'; '.join(parts)}); "
                         f"the model expects {', '.join(str(s) for s in specs)}")


def _with_batch_axis(a: np.ndarray, spec: TensorSpec, where) -> np.ndarray:
    a = np.asarray(a)
    if spec.shape and a.ndim == len(spec.shape) - 1:
        a = a[None]
    if spec.shape and a.ndim != len(spec.shape):
        raise UsageError(f"{where}: calibration array {spec.name} has shape {list(a.shape)} but the model input is "
                         f"{spec}; give arrays of rank {len(spec.shape)} (or {len(spec.shape) - 1} for one sample)")
    return a


def check_sample(sample: Mapping[str, np.ndarray], specs, where) -> dict[str, np.ndarray]:
    """Names, dtype kind and static dims of one sample; floats are cast to the model's dtype."""
    _check_names(set(sample), specs, where)
    out = {}
    for s in specs:
        a = np.asarray(sample[s.name])
        want = np.dtype(s.dtype if s.dtype != "bfloat16" else "float32")
        if a.ndim != len(s.shape):
            raise UsageError(f"{where}: calibration array {s.name} has shape {list(a.shape)}; the model input is {s}")
        for i, (got, d) in enumerate(zip(a.shape, s.shape)):
            if isinstance(d, int) and d > 0 and got != d and i > 0:
                raise UsageError(f"{where}: calibration array {s.name} has shape {list(a.shape)}; the model input is "
                                 f"{s} (dim {i} must be {d})")
        if (a.dtype.kind == "f") != (want.kind == "f"):
            raise UsageError(f"{where}: calibration array {s.name} is {a.dtype}; the model input is {s.dtype}")
        out[s.name] = a.astype(want, copy=False)
    return out
