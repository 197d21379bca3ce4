"""Relations between epoch figures and the loss that survive shared trends and autocorrelation.

Over a training almost every figure and the loss change decay together, and consecutive epochs
are strongly autocorrelated. A plain Spearman/Pearson test of the raw series then reports
p-values like 10⁻¹⁹⁷ from 27 points: it measures the shared trend and counts autocorrelated
epochs as independent draws. This module answers the same question soundly:

1. **Detrending.** Each series (figure and target alike) is replaced by its residuals after a
   smooth trend, a least-squares polynomial of degree `TREND_DEGREE` in log(1 + epoch) over the
   analysed window (``method="log-trend"``, the default), or by its first differences
   (``method="difference"``). The relation is then measured between the residuals: does a figure
   that is *above its own trend* at epoch k go with a loss change above *its* trend at k + lag?
2. **Significance from a block permutation.** The figure's residuals are cut into blocks of
   `block` consecutive epochs (about the series' integrated autocorrelation time, at least
   n^(1/3)) whose order is shuffled `permutations` times; each shuffle keeps the autocorrelation
   inside the blocks and breaks any alignment with the target. The permutation p-value is
   (1 + #{|r_perm| ≥ |r|}) / (1 + permutations), so it is never below 1/(1 + permutations): the
   permutation cannot resolve smaller probabilities, and the table does not pretend it can.
   Short blocks make it somewhat liberal when the dependence outlasts them, so the reported p is
   the larger of it and Student's t with the effective sample size
   n_eff = n / (1 + 2 Σ_k ρ_x(k)·ρ_y(k)) (Bartlett's formula for two autocorrelated series).
   Measured (tests/test_analysis.py): 0.04 of 200 null seeds with any q < 0.05.
3. **Confidence interval** of the residual correlation: Fisher's z with n_eff points.
4. **Multiple testing**: Benjamini–Hochberg q-values over every figure × target × lag tested.
5. **Out-of-sample check**: does the figure at epoch k improve the prediction of the target at
   k + lag beyond the target's own recent history? Rolling-origin evaluation: a linear model of the
   target on its `history` latest known values (at k, k−1, …), with and without the figure, is fit
   on the epochs before each of `folds` evaluation blocks and scored on the block.
   ``oos_gain`` = 1 − MSE(with figure) / MSE(history only): > 0 means the figure helps. It is
   computed on the detrended series (the trend itself is fit on the whole window, so the check
   asks whether the figure predicts the target's departures from its trend).

Everything here is numpy/scipy on arrays; nothing reads a store.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

#: Degree of the trend polynomial in log(1 + epoch) removed by ``method="log-trend"``.
TREND_DEGREE = 5
#: Detrending methods: the name and the sentence the report prints.
DETREND_METHODS: dict[str, str] = {
    "log-trend": f"residuals after a degree-{TREND_DEGREE} polynomial trend in log(1 + epoch)",
    "difference": "first differences between consecutive epochs",
}
#: Columns of the table `relation_tests` returns.
RELATION_COLUMNS: tuple[str, ...] = (
    "figure", "label", "layer", "target", "lag", "n", "r", "ci_low", "ci_high", "n_eff", "block", "p", "q",
    "oos_gain", "naive_rho", "naive_p",
)


def detrend(values: np.ndarray, epochs: np.ndarray, method: str = "log-trend") -> np.ndarray:
    """`values` (indexed like `epochs`; NaN allowed) minus their smooth trend, or differenced.

    ``log-trend``: residuals of a least-squares fit of a degree-`TREND_DEGREE` polynomial in
    u = log(1 + epoch), u rescaled to [−1, 1] (a well-conditioned basis); NaN stays NaN.
    ``difference``: values[k] − values[k−1] by epoch number (NaN after a gap).
    """
    values = np.asarray(values, dtype=float)
    epochs = np.asarray(epochs, dtype=float)
    if method == "difference":
        out = np.full_like(values, np.nan)
        consecutive = np.diff(epochs) == 1
        out[1:][consecutive] = np.diff(values)[consecutive]
        return out
    if method != "log-trend":
        raise ValueError(f"method must be one of {list(DETREND_METHODS)}, got {method!r}")
    out = np.full_like(values, np.nan)
    ok = np.isfinite(values) & np.isfinite(epochs)
    if ok.sum() <= TREND_DEGREE + 1:
        return out
    u = np.log1p(np.maximum(epochs[ok], 0.0))
    span = u.max() - u.min()
    u = (u - u.min()) / span * 2 - 1 if span > 0 else np.zeros_like(u)
    basis = np.polynomial.legendre.legvander(u, TREND_DEGREE)
    coef, *_ = np.linalg.lstsq(basis, values[ok], rcond=None)
    out[ok] = values[ok] - basis @ coef
    return out


def _acf(x: np.ndarray, max_lag: int) -> np.ndarray:
    """Sample autocorrelations ρ(1..max_lag) of a centred series."""
    x = x - x.mean()
    denominator = float(x @ x)
    if denominator == 0 or max_lag < 1:
        return np.zeros(max(max_lag, 0))
    # Through the FFT: O(n log n), where np.correlate is O(n²) for a training of thousands of epochs.
    size = 1 << int(2 * len(x) - 1).bit_length()
    spectrum = np.fft.rfft(x, size)
    full = np.fft.irfft(spectrum * np.conj(spectrum), size)[1:max_lag + 1]
    return full / denominator


def effective_sample_size(x: np.ndarray, y: np.ndarray) -> float:
    """Bartlett's n_eff = n / (1 + 2 Σ_k ρ_x(k)ρ_y(k)) for the correlation of two autocorrelated
    series, the sum truncated at n/4 lags; clipped to [3, n]."""
    n = len(x)
    if n < 4:
        return float(n)
    rx, ry = _acf(x, n // 4), _acf(y, n // 4)
    inflation = 1 + 2 * float(rx @ ry)
    return float(np.clip(n / max(inflation, 1e-12), 3.0, n))


def block_length(x: np.ndarray, y: np.ndarray) -> int:
    """Permutation block length: the larger integrated autocorrelation time of the two series
    (1 + 2 Σ ρ(k), summed until ρ first turns negative), and at least n^(1/3); at most n/4."""
    n = len(x)

    def tau(series: np.ndarray) -> float:
        rho = _acf(series, max(1, n // 4))
        stop = np.flatnonzero(rho <= 0)
        rho = rho[: stop[0]] if stop.size else rho
        return 1 + 2 * float(rho.sum())

    block = max(math.ceil(n ** (1 / 3)), math.ceil(2 * max(tau(x), tau(y))))
    # Rounded up to a coarse grid (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, ...): tests of similar series then
    # share one set of permutations, which a long training's many tests need to stay fast.
    grid = sorted({1, 2, 3, 4, 5, 6} | {int(round(2 ** (k / 2))) * 2 for k in range(2, 30)})
    block = next(g for g in grid if g >= block)
    return int(max(1, min(block, n // 4 if n >= 8 else 1)))


def block_permutations(n: int, block: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` index arrays (count × n) that reorder n positions by shuffling blocks of `block`
    consecutive positions (circular blocks: each row first rotates the positions by a random
    offset, so that block edges fall anywhere; the wrap joins the last and first epochs once)."""
    blocks = -(-n // block)
    padded = np.arange(blocks * block, dtype=np.int32).reshape(blocks, block)  # entries >= n are padding
    order = np.argsort(rng.random((count, blocks)), axis=1)
    shuffled = padded[order].reshape(count, -1)
    if blocks * block != n:
        # Every row holds the same number of padding entries: drop them and keep the row shape.
        shuffled = shuffled[shuffled < n].reshape(count, n)
    offsets = rng.integers(0, n, size=(count, 1), dtype=np.int32)
    shuffled += offsets
    shuffled[shuffled >= n] -= n
    return shuffled


def _standardise(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=-1, keepdims=True)
    norm = np.sqrt((x * x).sum(axis=-1, keepdims=True))
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def permutation_test(x: np.ndarray, y: np.ndarray, permutations: int, rng: np.random.Generator,
                     block: int | None = None, cache: dict | None = None) -> tuple[float, float, int]:
    """Pearson r of (x, y), its two-sided block-permutation p-value and the block length used.

    p = (1 + #{|r_perm| ≥ |r|}) / (1 + permutations): floored at 1/(1 + permutations).
    `cache` (a dict) reuses the index arrays of a (length, block) between tests.
    """
    block = block or block_length(x, y)
    xs, ys = _standardise(x), _standardise(y)
    r = float(xs @ ys)
    key = (len(x), block, permutations)
    if cache is not None and key in cache:
        idx = cache[key]
    else:
        idx = block_permutations(len(x), block, permutations, rng)
        if cache is not None:
            cache[key] = idx
    # A permutation changes neither the mean nor the norm, so xs[idx] stays standardised. float32
    # halves the memory traffic of the gather; the 1e-6 tolerance counts its rounding as a tie.
    perm = xs.astype(np.float32)[idx] @ ys.astype(np.float32)
    p = (1 + int(np.count_nonzero(np.abs(perm) >= abs(r) - 1e-6))) / (1 + permutations)
    return r, p, block


def effective_size_p_value(r: float, n_eff: float) -> float:
    """Two-sided p-value of a correlation r from Student's t with n_eff − 2 degrees of freedom."""
    if not math.isfinite(r) or n_eff <= 3:
        return 1.0
    r = float(np.clip(r, -0.999999, 0.999999))
    t = r * math.sqrt((n_eff - 2) / (1 - r * r))
    return float(2 * stats.t.sf(abs(t), n_eff - 2))


def fisher_interval(r: float, n_eff: float, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of a correlation from Fisher's z with `n_eff` effective points."""
    if not math.isfinite(r) or n_eff <= 3:
        return (math.nan, math.nan)
    z = math.atanh(float(np.clip(r, -0.999999, 0.999999)))
    half = stats.norm.ppf(0.5 + level / 2) / math.sqrt(n_eff - 3)
    return (math.tanh(z - half), math.tanh(z + half))


def out_of_sample_gain(x: np.ndarray, y: np.ndarray, lag: int, *, history: int = 2, folds: int = 5,
                       min_train: int = 10) -> float:
    """1 − MSE(y[k+lag] ~ y's history + x[k]) / MSE(y[k+lag] ~ y's history), out of sample.

    x, y: aligned series over consecutive epochs (NaN where missing). The predictors at origin k
    are what is known at epoch k: y[k], y[k−1], …, y[k−history+1] (the target's own recent
    history) and x[k]. The last ~half of the usable origins is split into `folds` consecutive
    blocks; each block is predicted by a least-squares model fit on all origins before it
    (rolling origin, never using the future). NaN when there are too few points.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    n = len(y)
    origins = np.arange(history - 1, n - lag)
    if len(origins) == 0:
        return math.nan
    own = np.stack([y[origins - j] for j in range(history)], axis=1)
    target = y[origins + lag]
    figure = x[origins][:, None]
    ok = np.isfinite(own).all(1) & np.isfinite(target) & np.isfinite(figure[:, 0])
    own, target, figure = own[ok], target[ok], figure[ok]
    m = len(target)
    if m < max(min_train + folds, 2 * (history + 3)):
        return math.nan
    first = max(min_train, m // 2)
    edges = np.linspace(first, m, folds + 1).astype(int)
    errors = np.zeros(2)
    for a, b in zip(edges[:-1], edges[1:]):
        if b <= a:
            continue
        for j, design in enumerate((own, np.hstack([own, figure]))):
            with_intercept = np.hstack([np.ones((m, 1)), design])
            coef, *_ = np.linalg.lstsq(with_intercept[:a], target[:a], rcond=None)
            errors[j] += float(((with_intercept[a:b] @ coef - target[a:b]) ** 2).sum())
    return math.nan if errors[0] == 0 else 1.0 - errors[1] / errors[0]


def _window(frame: pd.DataFrame, window: tuple[int | None, int | None] | None) -> pd.DataFrame:
    if window is None:
        return frame
    start, stop = window
    keep = np.ones(len(frame), dtype=bool)
    if start is not None:
        keep &= frame.index.to_numpy() >= start
    if stop is not None:
        keep &= frame.index.to_numpy() <= stop
    return frame[keep]


def relation_tests(
    columns: Mapping[tuple[str, str, str], pd.Series],
    targets: Mapping[str, pd.Series],
    lags: Iterable[int] = range(0, 4),
    *,
    window: tuple[int | None, int | None] | None = None,
    method: str = "log-trend",
    permutations: int = 999,
    seed: int = 0,
    min_points: int = 12,
    history: int = 2,
    out_of_sample: bool = True,
) -> pd.DataFrame:
    """Detrended, block-permutation tests of every figure against every target at every lag.

    Args:
        columns: (figure, label, layer) → the figure's series, indexed by epoch.
        targets: target name → its series (e.g. the change of the validation loss), by epoch.
        lags: the figure of epoch k is paired with the target of epoch k + lag.
        window: (first, last) epoch analysed, inclusive; None for every epoch. Trends are fit
            inside the window.
        method: a key of `DETREND_METHODS`.
        permutations: block permutations per test (p-values are floored at 1/(1+permutations)).
        seed: seed of the permutations (the table is reproducible).
        min_points: pairs needed for a row; constant figures give no row.
        history: the target's own lags in the out-of-sample baseline.
        out_of_sample: compute ``oos_gain`` (NaN otherwise).

    Returns:
        A DataFrame with `RELATION_COLUMNS`; ``r`` is the residual Pearson correlation, ``p`` its
        block-permutation p-value, ``q`` the Benjamini–Hochberg q-value over all rows, and
        ``naive_rho``/``naive_p`` the plain Spearman test of the raw series, kept to show how far
        the trend misleads it.
    """
    lags = sorted(set(int(lag) for lag in lags))
    if not lags or lags[0] < 0:
        raise ValueError(f"lags must be integers >= 0, got {lags}")
    rng = np.random.default_rng(seed)
    permutation_cache: dict = {}
    rows = []
    for target_name, target in targets.items():
        y_raw = _window(target.astype(float), window)
        for (figure, label, layer), series in columns.items():
            x_raw = _window(series.astype(float), window)
            index = np.union1d(x_raw.index.to_numpy(), y_raw.index.to_numpy())
            if len(index) == 0:
                continue
            epochs = np.arange(index.min(), index.max() + 1)
            x_all = x_raw.reindex(epochs).to_numpy(float)
            y_all = y_raw.reindex(epochs).to_numpy(float)
            finite = x_all[np.isfinite(x_all)]
            if finite.size < min_points or np.ptp(finite) == 0:
                continue
            x_res, y_res = detrend(x_all, epochs, method), detrend(y_all, epochs, method)
            for lag in lags:
                xs = x_res[: len(epochs) - lag] if lag else x_res
                ys = y_res[lag:]
                ok = np.isfinite(xs) & np.isfinite(ys)
                if ok.sum() < min_points or np.ptp(xs[ok]) == 0 or np.ptp(ys[ok]) == 0:
                    continue
                r, p_perm, block = permutation_test(xs[ok], ys[ok], permutations, rng, cache=permutation_cache)
                n_eff = effective_sample_size(xs[ok], ys[ok])
                # Both approximations can be liberal when the dependence outlasts the blocks or the
                # autocorrelations are estimated from few points: keep the more cautious one.
                p = max(p_perm, effective_size_p_value(r, n_eff))
                low, high = fisher_interval(r, n_eff)
                xr, yr = (x_all[: len(epochs) - lag] if lag else x_all), y_all[lag:]
                raw_ok = np.isfinite(xr) & np.isfinite(yr)
                naive = stats.spearmanr(xr[raw_ok], yr[raw_ok]) if raw_ok.sum() >= 3 else None
                gain = out_of_sample_gain(x_res, y_res, lag, history=history) if out_of_sample else math.nan
                rows.append({
                    "figure": figure, "label": label, "layer": layer, "target": target_name, "lag": lag,
                    "n": int(ok.sum()), "r": r, "ci_low": low, "ci_high": high, "n_eff": n_eff, "block": block,
                    "p": p, "q": math.nan, "oos_gain": gain,
                    "naive_rho": float(naive.statistic) if naive is not None else math.nan,
                    "naive_p": float(naive.pvalue) if naive is not None else math.nan,
                })
    table = pd.DataFrame(rows, columns=list(RELATION_COLUMNS))
    if len(table):
        table["q"] = stats.false_discovery_control(table["p"].to_numpy(float), method="bh")
    return table


def rank_tests(table: pd.DataFrame, top: int | None = 20) -> pd.DataFrame:
    """The relation tests, most significant first (q, then |r|)."""
    out = table.assign(strength=table["r"].abs())
    out = out.sort_values(["q", "p", "strength"], ascending=[True, True, False], kind="mergesort").reset_index(drop=True)
    return out.head(top) if top is not None else out


__all__ = [
    "TREND_DEGREE", "DETREND_METHODS", "RELATION_COLUMNS", "detrend", "effective_sample_size", "block_length",
    "block_permutations", "permutation_test", "effective_size_p_value", "fisher_interval", "out_of_sample_gain", "relation_tests", "rank_tests",
]
