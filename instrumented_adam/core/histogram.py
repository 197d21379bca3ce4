"""The per-tensor step histograms (csrc/histogram.h) and what is read from them.

On the steps the optimizer is asked for (`histogram_every`), the kernel counts, per tensor and in
the same pass as the update, log2-binned histograms of |g|, |Δθ| and the effective step size,
binned from the floats' exponent bits. The bins are the same for every dtype; the value binned is
the kernel's, in its compute type (fp32 for fp32/bf16/fp16 parameters, fp64 for fp64):

    bin 0       exactly 0 (either sign)
    bin 1       0 < |x| < 2^-126
    bin b       2^(b-128) <= |x| < 2^(b-127) for b = 2 .. 255 (floor(log2 |x|) = b - 128)
    bin 256     2^128 <= |x| < inf (finite fp64 values only)
    bin 257     NaN or ±inf

This module imports neither torch nor the extension (the analysis layer reads stored histograms
with it); `tests/test_histograms.py` checks that its layout is the extension's. Quantiles treat
the histogram as the distribution of |x| with NaN/±inf above every finite value.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

#: (name, definition) per histogram, in the kernel's order (csrc/histogram.h, IA_FOR_EACH_HISTOGRAM).
HISTOGRAM_TABLE: tuple[tuple[str, str], ...] = (
    ("grad_abs", "|g|, the gradient after AMP unscaling, before maximize and weight decay"),
    ("update_abs", "|Δθ|, the change actually applied (after rounding to the parameter's dtype)"),
    ("eff_lr", "the per-element effective step size lr/(bc1·(√(v/bc2)+ε)) (Adamax: lr/(bc1·u))"),
)
HISTOGRAM_NAMES: tuple[str, ...] = tuple(name for name, _ in HISTOGRAM_TABLE)
HISTOGRAM_KINDS = len(HISTOGRAM_NAMES)
MIN_EXPONENT = -126  # floor(log2|x|) of the first exponent bin
MAX_EXPONENT = 127
ZERO_BIN = 0
UNDERFLOW_BIN = 1
FIRST_EXPONENT_BIN = 2
OVERFLOW_BIN = FIRST_EXPONENT_BIN + MAX_EXPONENT - MIN_EXPONENT + 1  # 256
NONFINITE_BIN = OVERFLOW_BIN + 1  # 257
HISTOGRAM_BINS = NONFINITE_BIN + 1  # 258

#: TensorBoard's distribution view draws these percentiles (its basis points /100).
TENSORBOARD_PERCENTILES: tuple[float, ...] = (0.0, 6.68, 15.87, 30.85, 50.0, 69.15, 84.13, 93.32, 100.0)


def bin_lower_edges() -> np.ndarray:
    """The smallest |x| of each bin (0 for the zero bin, inf for the non-finite bin)."""
    edges = np.empty(HISTOGRAM_BINS)
    edges[ZERO_BIN] = 0.0
    edges[UNDERFLOW_BIN] = math.ldexp(1.0, -1074)  # the smallest fp64 subnormal
    edges[FIRST_EXPONENT_BIN:OVERFLOW_BIN] = np.ldexp(1.0, np.arange(MIN_EXPONENT, MAX_EXPONENT + 1))
    edges[OVERFLOW_BIN] = math.ldexp(1.0, MAX_EXPONENT + 1)
    edges[NONFINITE_BIN] = math.inf
    return edges


def bin_upper_edges() -> np.ndarray:
    """The bound |x| stays below in each bin (the zero bin's is 0; non-finite: inf)."""
    edges = np.empty(HISTOGRAM_BINS)
    edges[ZERO_BIN] = 0.0
    edges[UNDERFLOW_BIN] = math.ldexp(1.0, MIN_EXPONENT)
    edges[FIRST_EXPONENT_BIN:OVERFLOW_BIN] = np.ldexp(1.0, np.arange(MIN_EXPONENT + 1, MAX_EXPONENT + 2))
    edges[OVERFLOW_BIN] = math.inf
    edges[NONFINITE_BIN] = math.inf
    return edges


def bin_labels() -> list[str]:
    """A short label per bin: '0', '<2^-126', '2^e', '>=2^128', 'nan/inf'."""
    labels = ["0", f"<2^{MIN_EXPONENT}"]
    labels += [f"2^{e}" for e in range(MIN_EXPONENT, MAX_EXPONENT + 1)]
    return labels + [f">=2^{MAX_EXPONENT + 1}", "nan/inf"]


def bin_of(values: np.ndarray) -> np.ndarray:
    """The bin of each value (numpy, any float dtype; an independent formula: frexp, not bits)."""
    x = np.abs(np.asarray(values, dtype=np.float64))
    with np.errstate(invalid="ignore"):
        _, e = np.frexp(x)  # x = m·2^e with m in [0.5, 1): floor(log2 x) = e - 1
    floor_log2 = e.astype(np.int64) - 1
    bins = np.clip(floor_log2 - MIN_EXPONENT + FIRST_EXPONENT_BIN, UNDERFLOW_BIN, OVERFLOW_BIN)
    bins = np.where(x == 0, ZERO_BIN, bins)
    return np.where(np.isfinite(x), bins, NONFINITE_BIN)


def counts_of(values: np.ndarray) -> np.ndarray:
    """The histogram of `values` (int64 counts per bin), as the kernel counts it."""
    return np.bincount(bin_of(np.ravel(values)), minlength=HISTOGRAM_BINS).astype(np.int64)


def quantiles(counts: Sequence[int] | np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Quantiles (qs in [0, 1]) of |x| from its histogram, each inside the bin that holds it.

    Within an exponent bin [2^e, 2^(e+1)) the value is interpolated geometrically by rank (the
    bins are log-uniform), so a quantile is never more than one bin from the exact one; the zero
    bin gives 0, the underflow bin 2^-126, the overflow and non-finite bins inf. NaN when the
    histogram is empty. `counts` may be [..., HISTOGRAM_BINS]; the result is [..., len(qs)].
    """
    c = np.asarray(counts, dtype=np.float64)
    qs_arr = np.asarray(qs, dtype=np.float64)
    flat = c.reshape(-1, c.shape[-1])
    out = np.full((flat.shape[0], len(qs_arr)), np.nan)
    lower = np.log2(np.maximum(bin_lower_edges(), 1e-320))
    for r, row in enumerate(flat):
        total = row.sum()
        if total <= 0:
            continue
        cum = np.cumsum(row)
        for j, q in enumerate(qs_arr):
            rank = min(max(q, 0.0), 1.0) * total  # how many elements lie at or below the value
            b = int(np.searchsorted(cum, rank, side="left")) if rank > 0 else int(np.argmax(row > 0))
            b = min(b, HISTOGRAM_BINS - 1)
            if b == ZERO_BIN:
                out[r, j] = 0.0
            elif b == UNDERFLOW_BIN:
                out[r, j] = math.ldexp(1.0, MIN_EXPONENT)
            elif b >= OVERFLOW_BIN:
                out[r, j] = math.inf
            else:
                before = cum[b] - row[b]
                frac = 0.0 if row[b] == 0 else min(max((rank - before) / row[b], 0.0), 1.0)
                out[r, j] = 2.0 ** (lower[b] + frac)
    return out.reshape(*c.shape[:-1], len(qs_arr))


def median(counts: Sequence[int] | np.ndarray) -> np.ndarray | float:
    """The median |x| from a histogram (see `quantiles`)."""
    result = quantiles(counts, [0.5])[..., 0]
    return float(result) if np.ndim(result) == 0 else result


__all__ = [
    "HISTOGRAM_TABLE", "HISTOGRAM_NAMES", "HISTOGRAM_KINDS", "HISTOGRAM_BINS", "MIN_EXPONENT", "MAX_EXPONENT",
    "ZERO_BIN", "UNDERFLOW_BIN", "FIRST_EXPONENT_BIN", "OVERFLOW_BIN", "NONFINITE_BIN", "TENSORBOARD_PERCENTILES",
    "bin_lower_edges", "bin_upper_edges", "bin_labels", "bin_of", "counts_of", "quantiles", "median",
]
