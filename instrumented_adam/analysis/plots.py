"""Figures of recorded runs (matplotlib), drawn from the quantities of `instrumented_adam.analysis`.

Every function takes already-computed data (`analysis.RunData`, correlation tables) and
returns a `matplotlib.figure.Figure`; none reads the store or computes statistics, so the same
figures can be drawn from a notebook with other data. Figures are built with the object API
(`Figure`, not `pyplot`): no global backend is selected and nothing is left open, which keeps
the module safe to import in a notebook or a server. Runs keep the same colour (their position
in the list passed) across all figures of a report.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, TwoSlopeNorm
from matplotlib.figure import Figure

from ..core.figures import label
from .relations import RunData, correlation_matrix
from .surfaces import LOSS_SURFACE_KEY, quadratic_mse

#: Width of a full-width figure, inches (at the report's 100 dpi: 1000 px).
WIDTH = 10.0
#: Most points drawn per line: longer series are thinned (every k-th point, last kept).
MAX_POINTS = 4000


def run_color(index: int) -> str:
    """The colour of the run at `index` (matplotlib's default cycle)."""
    return f"C{index % 10}"


def plain(text: str) -> str:
    """Text shown as is: a '$' in a run name must not start matplotlib's mathtext."""
    return text.replace("$", r"\$")


def _thin(df: pd.DataFrame, max_points: int = MAX_POINTS) -> pd.DataFrame:
    if len(df) <= max_points:
        return df
    stride = math.ceil(len(df) / max_points)
    keep = np.zeros(len(df), dtype=bool)
    keep[::stride] = True
    keep[-1] = True
    return df[keep]


def _figure(ncols: int = 1, height: float = 3.4, nrows: int = 1, width: float = WIDTH) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width, height * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _positive(values: pd.Series) -> bool:
    v = values.to_numpy(float)
    v = v[np.isfinite(v)]
    return len(v) > 0 and bool((v > 0).all())


def _log_if_positive(ax, frames: Sequence[pd.Series]) -> None:
    """Log y scale when every finite value drawn is positive (a log axis cannot show 0)."""
    if frames and all(_positive(f) for f in frames if f.notna().any()) and any(f.notna().any() for f in frames):
        ax.set_yscale("log")


def _legend(ax, runs: Sequence[RunData], extra: Sequence[tuple[str, str]] = ()) -> None:
    """One legend entry per run (colour), plus line-style entries (style, meaning)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=run_color(i), lw=2, label=plain(r.label)) for i, r in enumerate(runs)]
    handles += [Line2D([], [], color="0.3", ls=style, label=meaning) for style, meaning in extra]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.8)


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _col(run: RunData, column: str) -> pd.Series | None:
    return run.epochs[column] if column in run.epochs else None


# ---- training curves ------------------------------------------------------------------------
def plot_losses(runs: Sequence[RunData]) -> Figure:
    """Training (solid) and validation (dashed) loss per epoch; accuracy beside it when logged."""
    has_acc = any(c in r.epochs for r in runs for c in ("val_accuracy", "train_accuracy"))
    fig, axes = _figure(2 if has_acc else 1)
    ax = axes[0]
    drawn: list[pd.Series] = []
    for i, r in enumerate(runs):
        for col, style in (("train_loss", "-"), ("val_loss", "--")):
            s = _col(r, col)
            if s is not None and s.notna().any():
                ax.plot(r.epochs["epoch"], s, style, color=run_color(i), lw=1.5)
                drawn.append(s)
    if not drawn:
        _empty(ax, "no train_loss / val_loss metrics logged")
    _log_if_positive(ax, drawn)
    ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    _legend(ax, runs, [("-", "train"), ("--", "validation")])
    if has_acc:
        ax = axes[1]
        for i, r in enumerate(runs):
            for col, style in (("train_accuracy", "-"), ("val_accuracy", "--")):
                s = _col(r, col)
                if s is not None:
                    ax.plot(r.epochs["epoch"], s, style, color=run_color(i), lw=1.5)
        ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
        _legend(ax, runs, [("-", "train"), ("--", "validation")])
    return fig


def plot_hyperparameters(runs: Sequence[RunData]) -> Figure:
    """The learning rate and the weight decay in force at each step (param group 0)."""
    fig, axes = _figure(2)
    for j, (col, title) in enumerate((("lr", "Learning rate in force"), ("weight_decay", "Weight decay in force"))):
        ax = axes[j]
        drawn = []
        for i, r in enumerate(runs):
            if len(r.steps) and col in r.steps:
                s = _thin(r.steps[["step", col]])
                ax.plot(s["step"], s[col], color=run_color(i), lw=1.5)
                drawn.append(s[col])
            elif col in r.epochs:
                ax.plot(r.epochs["step"], r.epochs[col], color=run_color(i), lw=1.5, drawstyle="steps-pre")
                drawn.append(r.epochs[col])
        if col == "lr":
            _log_if_positive(ax, drawn)
        ax.set(xlabel="optimizer step", ylabel=col, title=title)
    _legend(axes[0], runs)
    return fig


# ---- epoch geometry ---------------------------------------------------------------------------
def plot_epoch_steps(runs: Sequence[RunData]) -> Figure:
    """Norm of each epoch's step ‖s_k‖ (log) and the angle between consecutive epoch steps."""
    fig, axes = _figure(2)
    drawn = []
    for i, r in enumerate(runs):
        if "step_norm" in r.epochs:
            axes[0].plot(r.epochs["epoch"], r.epochs["step_norm"], color=run_color(i), lw=1.5)
            drawn.append(r.epochs["step_norm"])
        if "angle_prev_deg" in r.epochs:
            axes[1].plot(r.epochs["epoch"], r.epochs["angle_prev_deg"], color=run_color(i), lw=1.5, marker=".", ms=3)
    _log_if_positive(axes[0], drawn)
    axes[0].set(xlabel="epoch", ylabel=label("step_norm"), title="Epoch step norm")
    axes[1].axhline(90, color="0.4", ls=":", lw=1)
    axes[1].set(xlabel="epoch", ylabel="degrees", title="Angle between consecutive epoch steps", ylim=(0, 180))
    axes[1].set_yticks([0, 45, 90, 135, 180])
    _legend(axes[0], runs)
    return fig


def plot_distance(runs: Sequence[RunData]) -> Figure:
    """Distance from the initial parameters ‖θ − θ₀‖ and the parameter norm, per epoch."""
    fig, axes = _figure(2)
    for i, r in enumerate(runs):
        if "distance_from_init" in r.epochs:
            axes[0].plot(r.epochs["epoch"], r.epochs["distance_from_init"], color=run_color(i), lw=1.5)
        if "param_norm_mean" in r.epochs:
            axes[1].plot(r.epochs["epoch"], r.epochs["param_norm_mean"], color=run_color(i), lw=1.5)
    axes[0].set(xlabel="epoch", ylabel=label("distance_from_init"), title="Distance from initialisation")
    axes[1].set(xlabel="epoch", ylabel=label("param_norm_mean"), title="Parameter norm (epoch mean)")
    _legend(axes[0], runs)
    return fig


def _band(ax, r: RunData, figure: str, color: str) -> pd.Series | None:
    """The epoch mean of a step figure as a line, its min…max over the epoch as a band."""
    mean = _col(r, f"{figure}_mean")
    if mean is None:
        return None
    ax.plot(r.epochs["epoch"], mean, color=color, lw=1.5)
    lo, hi = _col(r, f"{figure}_min"), _col(r, f"{figure}_max")
    if lo is not None and hi is not None:
        ax.fill_between(r.epochs["epoch"], lo, hi, color=color, alpha=0.15, lw=0)
        return pd.concat([mean, lo, hi])
    return mean


def plot_moments(runs: Sequence[RunData]) -> Figure:
    """Gradient and first-moment norms, the mean second moment and the effective lr per epoch.

    Lines are the epoch means of the per-step figures; bands span their min…max in the epoch.
    """
    fig, axes = _figure(2, nrows=2, height=3.0)
    panels = (
        ("grad_norm", label("grad_norm"), "Gradient norm"),
        ("exp_avg_norm", label("exp_avg_norm"), "First moment norm"),
        ("second_moment_mean", "mean of v (Adamax: u)", "Second moment, mean element"),
        ("eff_lr_mean", "lr / (bc1·(√v̂ + ε))", "Effective lr (dotted: largest element)"),
    )
    for ax, (figure, ylabel, title) in zip(axes, panels):
        drawn = []
        for i, r in enumerate(runs):
            d = _band(ax, r, figure, run_color(i))
            if d is not None:
                drawn.append(d)
            if figure == "eff_lr_mean" and "eff_lr_max_max" in r.epochs:
                ax.plot(r.epochs["epoch"], r.epochs["eff_lr_max_max"], ":", color=run_color(i), lw=1.2)
                drawn.append(r.epochs["eff_lr_max_max"])
        _log_if_positive(ax, drawn)
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    _legend(axes[0], runs)
    return fig


def plot_step_figures(runs: Sequence[RunData]) -> Figure:
    """Update/parameter ratio and the cosines of the update with the gradient and previous epoch."""
    fig, axes = _figure(3, height=3.2)
    panels = (
        ("update_to_param", label("update_to_param"), "Update / parameter ratio"),
        ("cos_update_grad", "cosine", label("cos_update_grad")),
        ("cos_update_prev_epoch", "cosine", label("cos_update_prev_epoch")),
    )
    for ax, (figure, ylabel, title) in zip(axes, panels):
        drawn = []
        for i, r in enumerate(runs):
            d = _band(ax, r, figure, run_color(i))
            if d is not None:
                drawn.append(d)
        if figure == "update_to_param":
            _log_if_positive(ax, drawn)
        else:
            ax.axhline(0, color="0.4", lw=0.8)
            ax.set_ylim(-1.05, 1.05)
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    _legend(axes[0], runs)
    return fig


def plot_layer_heatmap(run: RunData, figure: str = "step_norm", title: str | None = None) -> Figure:
    """Per-layer epoch step norms (log colour scale): rows layers, columns epochs."""
    from .relations import layer_series

    wide = layer_series(run.layers, figure)
    n_layers = max(1, wide.shape[1])
    fig, axes = _figure(1, height=min(1.2 + 0.28 * n_layers, 9.0))
    ax = axes[0]
    ax.grid(False)
    if wide.empty:
        _empty(ax, "no per-layer rows recorded")
        return fig
    values = wide.to_numpy(float).T  # layers × epochs
    finite = values[np.isfinite(values) & (values > 0)]
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size and finite.max() > finite.min() else None
    epochs = wide.index.to_numpy()
    extent = (epochs[0] - 0.5, epochs[-1] + 0.5, n_layers - 0.5, -0.5)
    image = ax.imshow(
        np.where(values > 0, values, np.nan), aspect="auto", interpolation="nearest", norm=norm, extent=extent, cmap="viridis"
    )
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels(list(wide.columns), fontsize=8)
    ax.set(xlabel="epoch", title=title or f"{plain(run.label)}: per-layer epoch step norm ‖s_k‖")
    fig.colorbar(image, ax=ax, label=figure, pad=0.01)
    return fig


# ---- loss relations ---------------------------------------------------------------------------
def plot_predicted_vs_actual(runs: Sequence[RunData]) -> Figure:
    """First-order prediction Σ⟨Δθ, g⟩ of each epoch against the actual change of the training loss.

    Left: both over epochs (symmetric log scale); right: one against the other, with y = x.
    """
    fig, axes = _figure(2)
    values = []
    for i, r in enumerate(runs):
        e = r.epochs
        if "predicted_loss_change" not in e or "train_loss_change" not in e:
            continue
        axes[0].plot(e["epoch"], e["predicted_loss_change"], "-", color=run_color(i), lw=1.5)
        axes[0].plot(e["epoch"], e["train_loss_change"], "--", color=run_color(i), lw=1.5)
        axes[1].scatter(e["predicted_loss_change"], e["train_loss_change"], s=12, color=run_color(i), alpha=0.7)
        values.append(e[["predicted_loss_change", "train_loss_change"]].to_numpy(float).ravel())
    if not values:
        for ax in axes:
            _empty(ax, "needs train_loss and update_dot_grad")
        return fig
    v = np.concatenate(values)
    v = np.abs(v[np.isfinite(v) & (v != 0)])
    # Linear within 10⁻³ of the largest change: late, tiny changes stay visible around 0
    # without spreading the axis over ten decades of noise.
    linthresh = float(v.max()) * 1e-3 if v.size else 1e-6
    for ax in axes:
        ax.set_yscale("symlog", linthresh=linthresh)
    axes[1].set_xscale("symlog", linthresh=linthresh)
    lim = float(v.max()) * 1.2 if v.size else 1.0
    axes[1].plot([-lim, lim], [-lim, lim], color="0.4", ls=":", lw=1)
    axes[0].set(xlabel="epoch", ylabel="loss change", title="Predicted (solid) and actual (dashed) train-loss change")
    axes[1].set(xlabel=label("update_dot_grad"), ylabel="actual Δ train loss", title="Predicted vs actual, per epoch (dotted: y = x)")
    _legend(axes[0], runs, [("-", "predicted"), ("--", "actual")])
    return fig


def plot_correlation_heatmap(corr: pd.DataFrame, title: str, coefficient: str = "spearman_rho", layer: str = "") -> Figure:
    """Correlation of each figure (rows) with the loss changes at each lag (columns), annotated.

    Cells where the coefficient's p-value is below 0.05 are marked with '*'.
    """
    matrix = correlation_matrix(corr, coefficient, layer)
    pvals = correlation_matrix(corr, coefficient.split("_")[0] + "_p", layer)
    n_rows = max(1, matrix.shape[0])
    fig, axes = _figure(1, height=1.4 + 0.32 * n_rows)
    ax = axes[0]
    ax.grid(False)
    if matrix.empty:
        _empty(ax, "not enough epochs to correlate")
        ax.set_title(title)
        return fig
    values = matrix.to_numpy(float)
    image = ax.imshow(values, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -1.0, 1.0), aspect="auto", interpolation="nearest")
    for (y, x), v in np.ndenumerate(values):
        if np.isfinite(v):
            star = "*" if pvals.iloc[y, x] < 0.05 else ""
            ax.text(x, y, f"{v:.2f}{star}", ha="center", va="center", fontsize=7, color="white" if abs(v) > 0.6 else "black")
    ax.set_yticks(range(len(matrix.index)))
    ax.set_yticklabels(matrix.index, fontsize=8)
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_xticklabels([f"{t.replace('_loss_change', '')}\nlag {lag}" for t, lag in matrix.columns], fontsize=8)
    name = "Spearman ρ" if coefficient.startswith("spearman") else "Pearson r"
    ax.set_title(f"{title} ({name}; * p < 0.05)")
    fig.colorbar(image, ax=ax, pad=0.01, label=name)
    return fig


# ---- two-parameter models -------------------------------------------------------------------
def surface_runs(runs: Sequence[RunData]) -> list[RunData]:
    """The runs that carry a loss surface and the parameter trajectory to draw on it."""
    out = []
    for r in runs:
        surface = r.hyperparameters.get(LOSS_SURFACE_KEY)
        params = surface.get("params", ()) if isinstance(surface, dict) else ()
        if len(params) == 2 and all(p in r.epochs for p in params):
            out.append(r)
    return out


def _surface_colors(runs: Sequence[RunData], colors: Sequence[str] | None) -> tuple[list[str], list[RunData]]:
    """The two-parameter runs with the colours they have in the other figures (position in `runs`)."""
    keep = set(map(id, surface_runs(runs)))
    colors = list(colors) if colors is not None else [run_color(i) for i in range(len(runs))]
    pairs = [(c, r) for c, r in zip(colors, runs) if id(r) in keep]
    return [c for c, _ in pairs], [r for _, r in pairs]


def _trajectory(r: RunData) -> tuple[np.ndarray, np.ndarray]:
    surface = r.hyperparameters[LOSS_SURFACE_KEY]
    px, py = surface["params"]
    xs, ys = r.epochs[px].to_numpy(float), r.epochs[py].to_numpy(float)
    start = surface.get("start")
    if start is not None:  # the path begins where training began, before the first epoch
        xs, ys = np.concatenate([[start[0]], xs]), np.concatenate([[start[1]], ys])
    return xs, ys


def plot_trajectory(runs: Sequence[RunData], colors: Sequence[str] | None = None) -> Figure:
    """The parameter path, one point per epoch end, over the contours of the training loss.

    For runs that stored a ``loss_surface`` (the demo's linear regression): its quadratic MSE
    is evaluated on a grid around the paths; the star is the least-squares solution.
    """
    colors, runs = _surface_colors(runs, colors)
    fig, axes = _figure(1, height=5.2, width=7.5)
    ax = axes[0]
    if not runs:
        _empty(ax, "no two-parameter run with a stored loss surface")
        return fig
    surface = runs[0].hyperparameters[LOSS_SURFACE_KEY]
    px, py = surface["params"]
    paths = [_trajectory(r) for r in runs]
    allx = np.concatenate([p[0] for p in paths] + [[surface["optimum"][0]]])
    ally = np.concatenate([p[1] for p in paths] + [[surface["optimum"][1]]])
    padx = 0.15 * (np.ptp(allx) or 1.0)
    pady = 0.15 * (np.ptp(ally) or 1.0)
    gx = np.linspace(allx.min() - padx, allx.max() + padx, 240)
    gy = np.linspace(ally.min() - pady, ally.max() + pady, 240)
    mx, my = np.meshgrid(gx, gy)
    loss = quadratic_mse(surface["moments"], mx, my)
    floor = float(quadratic_mse(surface["moments"], *surface["optimum"]))
    excess = np.maximum(loss - floor, 1e-12)
    # Log-spaced levels of the excess loss: the narrow valley near the optimum stays visible.
    levels = np.geomspace(max(excess.min(), excess.max() * 1e-5), excess.max(), 18)
    cs = ax.contourf(mx, my, excess, levels=levels, norm=LogNorm(), cmap="Greys_r", alpha=0.55)
    ax.contour(mx, my, excess, levels=levels, colors="0.35", linewidths=0.4)
    cbar = fig.colorbar(cs, ax=ax, label="train MSE − minimum", pad=0.01)
    cbar.set_ticks([t for t in 10.0 ** np.arange(-12, 13) if levels[0] <= t <= levels[-1]])
    for (xs, ys), r, c in zip(paths, runs, colors):
        ax.plot(xs, ys, "-", color=c, lw=1.4, label=plain(r.label))
        ax.plot(xs, ys, ".", color=c, ms=3)
        ax.plot(xs[0], ys[0], "o", color=c, ms=6, mfc="none")
        ax.plot(xs[-1], ys[-1], "s", color=c, ms=5)
    ax.plot(*surface["optimum"], "*", color="gold", mec="black", ms=14, label="least squares", zorder=5)
    ax.set(xlabel=px, ylabel=py, title="Path over the loss surface (○ start, □ end, one dot per epoch)")
    ax.grid(False)
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_parameters(runs: Sequence[RunData], colors: Sequence[str] | None = None) -> Figure:
    """The two parameters per epoch, with the least-squares values dashed."""
    colors, runs = _surface_colors(runs, colors)
    fig, axes = _figure(2, height=3.0)
    if not runs:
        for ax in axes:
            _empty(ax, "no two-parameter run")
        return fig
    surface = runs[0].hyperparameters[LOSS_SURFACE_KEY]
    for j, name in enumerate(surface["params"]):
        ax = axes[j]
        for r, c in zip(runs, colors):
            ax.plot(r.epochs["epoch"], r.epochs[name], color=c, lw=1.5, label=plain(r.label))
        ax.axhline(surface["optimum"][j], color="0.3", ls="--", lw=1, label="least squares")
        ax.set(xlabel="epoch", ylabel=name, title=f"{name} over training")
    axes[0].legend(fontsize=8)
    return fig


__all__ = [
    "run_color",
    "plain",
    "plot_losses",
    "plot_hyperparameters",
    "plot_epoch_steps",
    "plot_distance",
    "plot_moments",
    "plot_step_figures",
    "plot_layer_heatmap",
    "plot_predicted_vs_actual",
    "plot_correlation_heatmap",
    "surface_runs",
    "plot_trajectory",
    "plot_parameters",
]
