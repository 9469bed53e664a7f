"""Input signatures and the data fed to models: parse, load, generate (seeded)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from retool.errors import UsageError
from retool.types import TensorSpec

#: Seeded random integer inputs are drawn from 0..DEFAULT_INT_HIGH-1 when no range is known
#: (``--input ids:int64:batch,seq:0..30521``, or one derived from the model: retool/input_ranges.py).
#: Token ids / indices must stay small so that any embedding or gather in the model accepts them.
DEFAULT_INT_HIGH = 8
#: Size given to symbolic non-batch axes (sequence length ...) when none is known.
DEFAULT_DYNAMIC_DIM = 7
#: The two batch sizes checked when the batch axis is dynamic.
VERIFY_BATCH_SIZES = (1, 4)
#: The seed of the held-out inputs publish stores beside a model (samples.npz, a decoder's prompts): not the
#: calibration or validation seeds (0, 1, ...)
SAMPLES_SEED = 20261


def parse_specs(texts: Sequence[str | TensorSpec]) -> tuple[TensorSpec, ...]:
    """``--input`` texts (or TensorSpecs, kept) as specs; a name given twice is refused."""
    specs = []
    for t in texts:
        try:
            specs.append(t if isinstance(t, TensorSpec) else TensorSpec.parse(t))
        except ValueError as exc:
            raise UsageError(f"--input: {exc}") from None
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"--input {dup}: this input is given more than once ({names}); give each input once")
    return tuple(specs)


def load_npz(path) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: example inputs file not found")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except Exception as exc:  # zipfile/ValueError: not an npz
        raise UsageError(f"{p}: cannot read example inputs as .npz ({type(exc).__name__}: {exc}); "
                         f"save them with numpy.savez(path, name=array, ...)") from None


def specs_from_arrays(arrays: Mapping[str, np.ndarray], dynamic_batch: bool = True) -> tuple[TensorSpec, ...]:
    out = []
    for name, a in arrays.items():
        shape = list(a.shape)
        if dynamic_batch and shape:
            shape[0] = "batch"
        out.append(TensorSpec(name, str(a.dtype), tuple(shape)))
    return tuple(out)


def random_feeds(specs: Sequence[TensorSpec], batch: int = 1, seed: int = 0,
                 sizes: Mapping[str, int] | None = None, int_high: int = DEFAULT_INT_HIGH) -> dict[str, np.ndarray]:
    """Seeded random inputs matching ``specs``. Symbolic dims get the same size across inputs."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        shape = s.concrete(batch=batch, default_dim=DEFAULT_DYNAMIC_DIM, sizes=sizes)
        dt = np.dtype(s.dtype) if s.dtype != "bfloat16" else np.dtype("float32")
        if dt.kind == "f":
            feeds[s.name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind in "iu":
            lo, hi = s.value_range if s.value_range is not None else (0, int_high - 1)
            feeds[s.name] = rng.integers(lo, hi + 1, size=shape).astype(dt)
        elif dt.kind == "b":
            feeds[s.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise UsageError(f"cannot make random data for input {s.name} of dtype {s.dtype}; give --example-inputs")
    return feeds


def resize_batch(arrays: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Repeat/trim example arrays along axis 0 to ``batch`` rows."""
    out = {}
    for k, a in arrays.items():
        if a.ndim == 0:
            out[k] = a
            continue
        reps = -(-batch // a.shape[0])
        out[k] = np.concatenate([a] * reps, axis=0)[:batch] if reps > 1 else a[:batch]
    return out


def verification_feeds(specs: Sequence[TensorSpec], examples: Mapping[str, np.ndarray] | None = None,
                       seed: int = 0, batch_sizes: Sequence[int] = VERIFY_BATCH_SIZES) -> list[dict[str, np.ndarray]]:
    """The input sets used to check parity: one per batch size when the batch axis is dynamic."""
    dynamic = bool(specs) and all(s.has_dynamic_batch for s in specs if s.shape)
    sizes = list(batch_sizes) if dynamic else [None]
    static = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
    if not dynamic and examples and len(static) == 1:
        b0 = next(iter(static))  # a static batch: the model takes no other, whatever the examples hold
        if any(a.ndim and a.shape[0] != b0 for a in examples.values()):
            sizes = [b0]
    feeds = []
    for i, b in enumerate(sizes):
        if examples:
            feeds.append(dict(examples) if b is None else resize_batch(examples, b))
        else:
            feeds.append(random_feeds(specs, batch=b or 1, seed=seed + i))
    return feeds
