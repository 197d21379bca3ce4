"""Analysis of recorded runs: epoch-level series and their correlation with the loss.

The quantities here are computed from a `RunStore` (or from DataFrames shaped like its
loaders' output) and know nothing about plotting; `instrumented_adam.plots` draws them and
`instrumented_adam.report` assembles the HTML report.

    from instrumented_adam.store import RunStore
    from instrumented_adam import analysis

    store = RunStore("runs/exp.sqlite")
    series = analysis.epoch_series(store, "baseline")        # one row per epoch
    corr = analysis.run_correlations(store, "baseline", max_lag=3)
    analysis.rank_relations(corr, top=10)                     # the strongest relations

Lags: a figure X of epoch k is paired with the loss change of epoch k + lag, so lag 0 is the
same epoch and lag 2 asks whether X predicts the loss change two epochs later. The loss
change of epoch k is loss[k] − loss[k−1] (losses are taken at epoch ends), so the first
epoch has none.

`correlations` is the plain, naive test (kept for notebooks and as the baseline the tests show
failing); `relations` is the one the report and `instrumented-adam report` use: detrended series,
autocorrelation-aware significance, confidence intervals, BH q-values and an out-of-sample check.

Caveat worth keeping in mind when reading the naive table: over a whole training most
figures and the loss change drift together (everything shrinks as training converges), so
strong correlations often reflect that shared trend rather than a mechanism. Many figures ×
targets × lags are tested: the Benjamini–Hochberg q-values account for that multiplicity.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ..core.figures import EPOCH_FIGURE_FORMULAS, STEP_FIGURE_FORMULAS, label
from . import significance

# What is correlated comes from the figure declarations (core.figures, torch-free) and the columns
# the store actually has; this module types no figure names of its own beyond the few it derives.
#: Figures declared for bookkeeping that are not relations to test: counts of bad elements (health
#: diagnostics report them), and the previous epoch's step and the raw dot product (cos_prev and
#: step_norm already carry them).
_NOT_RELATIONS = frozenset({"nonfinite_grads", "prev_step_norm", "step_dot_prev", "update_dot_grad"})
#: Columns `derive_epoch_series` adds, and the hyperparameters in force, with their labels.
DERIVED_FIGURES: dict[str, str] = {
    "predicted_loss_change": "predicted loss change Σ⟨Δθ, g⟩",
    "lr": "learning rate",
    "weight_decay": "weight decay",
}


def _epoch_figures() -> dict[str, str]:
    out = {f.name: f.label for f in EPOCH_FIGURE_FORMULAS if f.name not in _NOT_RELATIONS}
    for f in STEP_FIGURE_FORMULAS:
        if f.name in _NOT_RELATIONS:
            continue
        # The largest element's effective lr is summarised by its epoch maximum, the rest by the mean.
        column = f"{f.name}_max" if f.name == "eff_lr_max" else f"{f.name}_mean"
        out[column] = label(column)
    out.update(DERIVED_FIGURES)
    return out


#: Overall epoch-level figures related to the loss changes (column → label): the epoch geometry
#: and the epoch aggregate of every step figure declared in `core.figures`, plus what
#: `epoch_series` derives. `epoch_figures(frame)` adds any further aggregate the store holds.
EPOCH_FIGURES: dict[str, str] = _epoch_figures()

#: Per-tensor figures (columns of `RunStore.layers`) related per layer: the epoch geometry is the
#: epoch's, the step figures are those of the epoch's last step (what the store keeps).
LAYER_FIGURES: dict[str, str] = {
    **{f.name: f.label for f in EPOCH_FIGURE_FORMULAS if f.name not in _NOT_RELATIONS},
    **{name: f"{label(name)} (last step)" for name in ("update_to_param", "exp_avg_norm", "second_moment_mean", "eff_lr_mean")},
}


def epoch_figures(frame: pd.DataFrame) -> dict[str, str]:
    """The epoch figures `frame` has: the declared ones present, then every other ``<sum>_mean``
    aggregate of a statistic the table gained later (so a new statistic is related with no edit)."""
    out = {k: v for k, v in EPOCH_FIGURES.items() if k in frame}
    known = {f.name for f in STEP_FIGURE_FORMULAS}
    for column in frame.columns:
        if column.endswith("_mean") and column[: -len("_mean")] not in known and column not in out:
            out[column] = label(column)
    return out


#: The loss changes correlated against, when the run logged the loss.
TARGETS: dict[str, str] = {
    "train_loss_change": "Δ train loss",
    "val_loss_change": "Δ val loss",
}

#: Columns of the correlation table returned by `correlations`.
CORRELATION_COLUMNS: tuple[str, ...] = (
    "figure", "label", "layer", "target", "lag", "n",
    "pearson_r", "pearson_p", "spearman_rho", "spearman_p",
)


# ---- loading --------------------------------------------------------------------------------
@dataclass
class RunData:
    """Everything the report needs of one run, loaded once from the store.

    `epochs` is `epoch_series` (with the derived columns); `steps` and `layers` are the store's
    frames (empty when the run has none).
    """

    run_id: int
    name: str
    info: dict[str, Any]
    epochs: pd.DataFrame
    steps: pd.DataFrame
    layers: pd.DataFrame
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    #: The kernel's step histograms (`RunStore.histograms`; empty without histogram_every).
    histograms: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def label(self) -> str:
        """'<id>:<name>' — unique within a store even when names repeat."""
        return f"{self.run_id}:{self.name}"

    @property
    def group(self) -> str:
        """The comparison group of the run: its demo task, else its optimizer, else 'runs'."""
        task = self.hyperparameters.get("task")
        return str(task) if task else "runs"


def load_run(store: Any, run: int | str) -> RunData:
    """Loads one run's info, epoch series, steps and layers from a `RunStore`."""
    run_id = store.run_id(run)
    runs = store.runs()
    info = runs[runs["run_id"] == run_id].iloc[0].to_dict()
    hyper = info.get("hyperparameters")
    hyper = hyper if isinstance(hyper, dict) else {}
    steps = _numeric(store.steps(run_id))
    epochs = derive_epoch_series(store.epochs(run_id), steps)
    histograms = store.histograms(run_id) if hasattr(store, "histograms") else pd.DataFrame()
    return RunData(run_id, str(info.get("name", run_id)), info, epochs, steps, _numeric(store.layers(run_id)), hyper,
                   histograms)


def _numeric(df: pd.DataFrame, text: tuple[str, ...] = ("layer",)) -> pd.DataFrame:
    """Object columns (what an empty query returns) as float, except the known text columns."""
    df = df.copy()
    for col in df.columns:
        if df[col].dtype == object and col not in text:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def load_runs(store: Any, runs: Iterable[int | str] | None = None) -> list[RunData]:
    """Loads several runs (all runs of the store when `runs` is None or empty), in id order."""
    if not runs:
        ids = [int(r) for r in store.runs()["run_id"]]
    else:
        ids = sorted({store.run_id(r) for r in runs})
    return [load_run(store, r) for r in ids]


# ---- epoch series -------------------------------------------------------------------------
def derive_epoch_series(epochs: pd.DataFrame, steps: pd.DataFrame | None = None) -> pd.DataFrame:
    """The store's epoch rows plus derived columns, one row per epoch (sorted by epoch).

    Adds:
      angle_prev_deg           angle between consecutive epoch steps, degrees (NaN for the first)
      predicted_loss_change    Σ over the epoch's steps of ⟨Δθ, g⟩, the first-order prediction
                               of the loss change: mean over the recorded steps × steps in the
                               epoch, so that it holds when only every N-th step was recorded
      <loss>_change            loss[k] − loss[k−1] for every column ending in ``loss``
    """
    df = _numeric(epochs.sort_values("epoch").reset_index(drop=True))
    if "cos_prev" in df:
        df["angle_prev_deg"] = np.degrees(np.arccos(np.clip(df["cos_prev"].to_numpy(float), -1.0, 1.0)))
    df["predicted_loss_change"] = _predicted_change(df, steps)
    for col in [c for c in df.columns if c.endswith("loss")]:
        values = df.set_index("epoch")[col]
        # By epoch number, not position: a gap in the epochs gives NaN, not a wrong difference.
        previous = values.reindex(df["epoch"] - 1).to_numpy(float)
        df[f"{col}_change"] = df[col].to_numpy(float) - previous
    return df


def _predicted_change(df: pd.DataFrame, steps: pd.DataFrame | None) -> np.ndarray:
    if "update_dot_grad_mean" in df and "num_steps" in df:
        return df["update_dot_grad_mean"].to_numpy(float) * df["num_steps"].to_numpy(float)
    if steps is not None and len(steps) and "update_dot_grad" in steps:
        total = steps.groupby("epoch")["update_dot_grad"].sum()
        return total.reindex(df["epoch"]).to_numpy(float)
    return np.full(len(df), math.nan)


def epoch_series(store: Any, run: int | str) -> pd.DataFrame:
    """One row per epoch of `run`: the store's epoch rows, metrics and derived columns.

    See `derive_epoch_series` for the derived columns.
    """
    run_id = store.run_id(run)
    return derive_epoch_series(store.epochs(run_id), store.steps(run_id))


def layer_series(layers: pd.DataFrame, figure: str = "step_norm") -> pd.DataFrame:
    """A per-layer figure as a wide frame: index epoch, one column per layer (layer order kept)."""
    if layers.empty or figure not in layers:
        return pd.DataFrame()
    order = layers.drop_duplicates("layer").sort_values("layer_index" if "layer_index" in layers else "layer")["layer"]
    wide = layers.pivot_table(index="epoch", columns="layer", values=figure, aggfunc="first", dropna=False)
    wide = wide.reindex(columns=list(order))
    wide.columns.name = None
    return wide


def layer_wide(layers: pd.DataFrame, figures: Iterable[str] = LAYER_FIGURES) -> pd.DataFrame:
    """Per-layer figures as columns ``<layer>:<figure>``, index epoch (for correlations)."""
    parts = []
    for figure in figures:
        wide = layer_series(layers, figure)
        if not wide.empty:
            parts.append(wide.rename(columns=lambda layer, f=figure: f"{layer}:{f}"))
    return pd.concat(parts, axis=1) if parts else pd.DataFrame()


# ---- correlations ---------------------------------------------------------------------------
def lagged_pairs(x: pd.Series, y: pd.Series, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """The finite pairs (x[k], y[k + lag]) where both series are indexed by epoch."""
    shifted = y.reindex(x.index + lag).to_numpy(float)
    xv = x.to_numpy(float)
    ok = np.isfinite(xv) & np.isfinite(shifted)
    return xv[ok], shifted[ok]


def correlate(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Pearson r and Spearman ρ of two samples with their two-sided p-values (scipy.stats).

    NaN when fewer than 3 pairs, or when either sample is constant (no correlation is defined).
    """
    out = {"n": len(x), "pearson_r": math.nan, "pearson_p": math.nan, "spearman_rho": math.nan, "spearman_p": math.nan}
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    with warnings.catch_warnings():  # near-constant input: scipy warns and still answers
        warnings.simplefilter("ignore")
        pr = stats.pearsonr(x, y)
        sr = stats.spearmanr(x, y)
    out.update(
        pearson_r=float(pr.statistic), pearson_p=float(pr.pvalue),
        spearman_rho=float(sr.statistic), spearman_p=float(sr.pvalue),
    )
    return out


def correlations(
    series: pd.DataFrame,
    figures: Mapping[str, str] | Sequence[str] | None = None,
    targets: Mapping[str, str] | Sequence[str] | None = None,
    max_lag: int = 3,
    *,
    layers: pd.DataFrame | None = None,
    layer_figures: Mapping[str, str] | Sequence[str] | None = None,
    min_points: int = 5,
) -> pd.DataFrame:
    """Correlation of every figure with every target at lags 0…max_lag.

    Args:
        series: one row per epoch with an ``epoch`` column (e.g. `epoch_series`).
        figures: columns of `series` to correlate (default: those of `EPOCH_FIGURES` present).
        targets: columns of `series` to correlate with (default: those of `TARGETS` present).
        max_lag: the largest lag; figure of epoch k against target of epoch k + lag.
        layers: the store's per-layer frame, to correlate per-layer figures too (optional).
        layer_figures: per-layer figures (default `LAYER_FIGURES`).
        min_points: pairs needed for a row; figures that are constant (e.g. a fixed weight
            decay) give no row either.

    Returns:
        A DataFrame with `CORRELATION_COLUMNS`: figure, label, layer ('' for overall figures),
        target, lag, n, pearson_r, pearson_p, spearman_rho, spearman_p.
    """
    if max_lag < 0:
        raise ValueError(f"max_lag must be >= 0, got {max_lag}")
    figures = _labels(figures, EPOCH_FIGURES, series)
    targets = _labels(targets, TARGETS, series)
    indexed = series.set_index("epoch")
    columns: list[tuple[str, str, str, pd.Series]] = [(f, label, "", indexed[f]) for f, label in figures.items()]
    if layers is not None and not layers.empty:
        lfig = _labels(layer_figures, LAYER_FIGURES, layers)
        wide = layer_wide(layers, lfig)
        for col in wide.columns:
            layer, figure = col.rsplit(":", 1)
            columns.append((figure, lfig[figure], layer, wide[col]))
    rows = []
    for target, _ in targets.items():
        y = indexed[target]
        for figure, label, layer, x in columns:
            for lag in range(max_lag + 1):
                xs, ys = lagged_pairs(x, y, lag)
                result = correlate(xs, ys)
                if result["n"] < min_points or math.isnan(result["pearson_r"]):
                    continue
                rows.append({"figure": figure, "label": label, "layer": layer, "target": target, "lag": lag, **result})
    return pd.DataFrame(rows, columns=list(CORRELATION_COLUMNS))


def _labels(chosen: Mapping[str, str] | Sequence[str] | None, default: Mapping[str, str], frame: pd.DataFrame) -> dict[str, str]:
    """Figure → label for the chosen figures (or the defaults) that `frame` has."""
    if chosen is None:
        return {k: v for k, v in default.items() if k in frame}
    if isinstance(chosen, Mapping):
        items = dict(chosen)
    else:
        items = {k: default.get(k, k) for k in chosen}
    missing = [k for k in items if k not in frame]
    if missing:
        raise KeyError(f"no column(s) {missing} in the series (columns: {', '.join(map(str, frame.columns))})")
    return items


def run_correlations(
    store: Any, run: int | str, max_lag: int = 3, *, per_layer: bool = True, min_points: int = 5
) -> pd.DataFrame:
    """`correlations` of one stored run: overall figures, and per-layer ones when `per_layer`."""
    run_id = store.run_id(run)
    series = epoch_series(store, run_id)
    layers = store.layers(run_id) if per_layer else None
    return correlations(series, max_lag=max_lag, layers=layers, min_points=min_points)


#: Targets by their short names (CLI ``--target``): the loss whose change is predicted.
TARGET_CHOICES: dict[str, tuple[str, ...]] = {
    "val": ("val_loss_change",),
    "train": ("train_loss_change",),
    "both": ("val_loss_change", "train_loss_change"),
}


def relations(
    series: pd.DataFrame,
    *,
    target: str = "val",
    lags: Iterable[int] = range(0, 4),
    window: tuple[int | None, int | None] | None = None,
    figures: Mapping[str, str] | Sequence[str] | None = None,
    layers: pd.DataFrame | None = None,
    layer_figures: Mapping[str, str] | Sequence[str] | None = None,
    method: str = "log-trend",
    permutations: int = 999,
    seed: int = 0,
    min_points: int = 12,
) -> pd.DataFrame:
    """Relations of the epoch figures with a loss change that survive trends and autocorrelation.

    The sound counterpart of `correlations` (see `instrumented_adam.analysis.significance` for the
    method): detrended series, block-permutation p-values floored at 1/(1 + permutations),
    effective-sample-size confidence intervals, Benjamini–Hochberg q-values and an out-of-sample
    check against the target's own recent history.

    Args:
        series: one row per epoch (e.g. `epoch_series`).
        target: 'val' (default: the change of the validation loss), 'train', 'both', or a column.
        lags: figure of epoch k against the target of epoch k + lag.
        window: (first, last) epoch analysed, inclusive (None: all).
        figures, layers, layer_figures: as for `correlations`.
        method, permutations, seed, min_points: see `significance.relation_tests`.

    Returns:
        A table with `significance.RELATION_COLUMNS`, one row per figure × target × lag (and layer).
    """
    if target in TARGET_CHOICES:
        wanted = [t for t in TARGET_CHOICES[target] if t in series]
    elif target in series:
        wanted = [target]
    else:
        raise ValueError(f"target must be one of {list(TARGET_CHOICES)} or a column of the series, got {target!r}")
    indexed = series.set_index("epoch")
    chosen = epoch_figures(series) if figures is None else _labels(figures, EPOCH_FIGURES, series)
    columns = {(f, lab, ""): indexed[f] for f, lab in chosen.items()}
    if layers is not None and not layers.empty:
        lfig = _labels(layer_figures, LAYER_FIGURES, layers)
        wide = layer_wide(layers, lfig)
        for col in wide.columns:
            layer, figure = col.rsplit(":", 1)
            columns[(figure, lfig[figure], layer)] = wide[col]
    return significance.relation_tests(
        columns, {t: indexed[t] for t in wanted}, lags, window=window, method=method,
        permutations=permutations, seed=seed, min_points=min_points,
    )


def run_relations(store: Any, run: int | str, *, per_layer: bool = True, **kwargs: Any) -> pd.DataFrame:
    """`relations` of one stored run (keyword arguments as for `relations`)."""
    run_id = store.run_id(run)
    layers = store.layers(run_id) if per_layer else None
    return relations(epoch_series(store, run_id), layers=layers, **kwargs)


def rank_relations(corr: pd.DataFrame, top: int | None = 20, by: str = "spearman") -> pd.DataFrame:
    """The strongest relations first, with Benjamini–Hochberg q-values over the whole table.

    Args:
        corr: a table from `correlations`.
        top: rows to keep (None: all).
        by: 'spearman' (rank correlation, robust to the heavy tails of loss changes) or
            'pearson': the coefficient whose absolute value orders the rows.

    Returns:
        `corr`'s columns plus ``strength`` (|coefficient| used to rank), ``pearson_q`` and
        ``spearman_q`` (the p-values adjusted for the number of tests in `corr`).
    """
    if by not in ("spearman", "pearson"):
        raise ValueError(f"by must be 'spearman' or 'pearson', got {by!r}")
    out = corr.copy()
    for name in ("pearson", "spearman"):
        p = out[f"{name}_p"].to_numpy(float)
        q = np.full(len(p), math.nan)
        ok = np.isfinite(p)
        if ok.any():
            q[ok] = stats.false_discovery_control(p[ok], method="bh")
        out[f"{name}_q"] = q
    coef = "spearman_rho" if by == "spearman" else "pearson_r"
    out["strength"] = out[coef].abs()
    out = out.sort_values(["strength", f"{by}_p"], ascending=[False, True], kind="mergesort").reset_index(drop=True)
    return out.head(top) if top is not None else out


def correlation_matrix(corr: pd.DataFrame, coefficient: str = "spearman_rho", layer: str = "") -> pd.DataFrame:
    """The correlations of one level (``''``: the overall figures) as figure × (target, lag)."""
    sub = corr[corr["layer"] == layer]
    if sub.empty:
        return pd.DataFrame()
    wide = sub.pivot_table(index="label", columns=["target", "lag"], values=coefficient, aggfunc="first")
    order = list(dict.fromkeys(sub["label"]))
    return wide.reindex(order)


__all__ = [
    "EPOCH_FIGURES",
    "DERIVED_FIGURES",
    "epoch_figures",
    "TARGET_CHOICES",
    "relations",
    "run_relations",
    "LAYER_FIGURES",
    "TARGETS",
    "CORRELATION_COLUMNS",
    "RunData",
    "load_run",
    "load_runs",
    "derive_epoch_series",
    "epoch_series",
    "layer_series",
    "layer_wide",
    "lagged_pairs",
    "correlate",
    "correlations",
    "run_correlations",
    "rank_relations",
    "correlation_matrix",
]
