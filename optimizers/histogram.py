"""Histograms that survive the activation ranges transformers produce.

ORT's histogram calibrators (Percentile, Entropy) bin each tensor with numpy in the
tensor's own dtype. A transformer's attention mask is added as ``finfo(float32).min``
(about -3.4e38): the range (-3.4e38, 3.4e38) overflows float32 when numpy spaces the bin
edges, and numpy fails with "Too many bins for data range. Cannot create 2048
finite-sized bins". The same happens to a constant tensor of large magnitude (|x| +- 0.5
is |x| in float32), to ranges of denormal size, and, one chunk later, to a merge that
would need ~1e40 bins to keep the old bin width up to such a sentinel.

So, before binning: non-finite values and values beyond ``LIMIT`` are clipped to
+-``LIMIT`` (a quarter of float32's range: every span of two such values is still finite),
values below ``TINY`` in magnitude become 0 (no int8 scale resolves them), and a merge
that would grow the histogram past ``MAX_BINS`` re-bins the old counts into the new
range instead. The numbers that come out for ordinary tensors do not change.
"""
from __future__ import annotations

import numpy as np

#: |x| above this is a sentinel (a mask's -3.4e38, an inf), not a value a scale should cover finely
LIMIT = float(np.finfo(np.float32).max) / 4
#: |x| below this is 0 for int8 purposes
TINY = 1e-30
#: a merge never grows a histogram beyond this many bins
MAX_BINS = 1 << 16


def sanitize(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind != "f" or a.size == 0:
        return a
    out = np.nan_to_num(a, nan=0.0, posinf=LIMIT, neginf=-LIMIT)
    out = np.clip(out, -LIMIT, LIMIT)
    out[np.abs(out) < TINY] = 0
    return out.astype(a.dtype, copy=False)


def _clean(data):
    if isinstance(data, list):
        return [sanitize(x) for x in data]
    return sanitize(data)


def safe_collector(calibrator):
    """A HistogramCollector for ``calibrator`` (ORT's Percentile/Entropy calibrater) that cleans
    each tensor before binning; ORT creates its own only when none is set."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    class SafeHistogramCollector(HistogramCollector):
        def collect(self, name_to_arr):
            return super().collect({k: _clean(v) for k, v in name_to_arr.items()})

        def collect_absolute_value(self, name_to_arr):
            for k, v in name_to_arr.items():
                arr = (np.concatenate([np.asarray(x).ravel() for x in v]) if isinstance(v, list) and v
                       else np.asarray(v).ravel())
                if arr.size and arr.dtype.kind == "f" and np.nanmin(np.abs(arr)) == np.nanmax(np.abs(arr)) != 0:
                    # |x| of a constant tensor: a zero-width range that numpy widens by +-0.5, which large
                    # magnitudes swallow; one 0 keeps the range [0, max] (one count among thousands)
                    arr = np.concatenate([arr, np.zeros(1, arr.dtype)])
                old = self.histogram_dict.get(k)
                if old is not None and arr.size:
                    amax, top = float(np.nanmax(np.abs(arr))), float(old[1][-1])
                    width = max(float(old[1][1] - old[1][0]), TINY)
                    if amax > top and (amax - top) / width > MAX_BINS:  # ORT would add that many bins
                        self.histogram_dict[k] = _rebin_abs(old, arr, amax)
                        continue
                super().collect_absolute_value({k: arr})

        def merge_histogram(self, old_histogram, data_arr, new_min, new_max, new_threshold):
            old_hist, old_edges, old_min, old_max, old_threshold = old_histogram
            if new_threshold > old_threshold and old_threshold > 0:
                stride = 2 * float(old_threshold) / len(old_hist)
                grow = (float(new_threshold) - float(old_threshold)) // stride + 1
                if len(old_hist) + 2 * grow > MAX_BINS:
                    return _rebin(old_histogram, data_arr, new_min, new_max, new_threshold)
            return super().merge_histogram(old_histogram, data_arr, new_min, new_max, new_threshold)

    return SafeHistogramCollector(method=calibrator.method, symmetric=calibrator.symmetric,
                                  num_bins=calibrator.num_bins, num_quantized_bins=calibrator.num_quantized_bins,
                                  percentile=calibrator.percentile, scenario=calibrator.scenario)


def _rebin(old_histogram, data_arr, new_min, new_max, new_threshold):
    """The old counts moved (at their bin centres) into a histogram of the same bin count over the new range."""
    old_hist, old_edges, old_min, old_max, _ = old_histogram
    n = len(old_hist)
    rng = (-float(new_threshold), float(new_threshold))
    hist, edges = np.histogram(data_arr, n, range=rng)
    centres = (np.asarray(old_edges[:-1], np.float64) + np.asarray(old_edges[1:], np.float64)) / 2
    moved, _ = np.histogram(centres, n, range=rng, weights=old_hist)
    return (hist + moved.astype(hist.dtype), edges.astype(np.asarray(data_arr).dtype, copy=False),
            min(old_min, new_min), max(old_max, new_max), new_threshold)


def _rebin_abs(old_histogram, arr, amax):
    """The |x| histogram's old counts moved into the same bin count over [0, amax], plus ``arr``."""
    old_hist, old_edges, old_min, old_max = old_histogram
    n = len(old_hist)
    hist, edges = np.histogram(np.abs(arr), n, range=(0.0, amax))
    centres = (np.asarray(old_edges[:-1], np.float64) + np.asarray(old_edges[1:], np.float64)) / 2
    moved, _ = np.histogram(centres, n, range=(0.0, amax), weights=old_hist)
    return (hist + moved.astype(hist.dtype), edges.astype(arr.dtype, copy=False),
            min(old_min, np.nanmin(arr)), max(old_max, np.nanmax(arr)))
