"""Interactive figures of recorded runs as Plotly figure specifications (plain dicts).

Each function takes loaded data (`RunData`) and returns ``{"data": [...], "layout": {...}}``, which
the report hands to ``Plotly.newPlot`` (plotly.js is inlined once per page, so the page works
offline). Building plain dicts instead of `plotly.graph_objects` keeps a report of thousands of
epochs fast: nothing is validated trace by trace.

Readability rules the static figures broke, kept here:
- every trace of a run shares its ``legendgroup``: one click on a run in the legend hides or
  shows all its lines, a double click isolates it;
- long series are thinned for display only (`MAX_DISPLAY_POINTS` per trace, first and last kept);
  the statistics are always computed on every epoch;
- epochs and steps are integers on the axes (``tickformat: "d"``, no ``2e+04``);
- signed quantities spanning decades use a signed-log axis drawn as asinh(y / scale) with ticks
  labelled in the data's units and spaced so that labels do not collide near 0;
- a panel whose values are all one constant (weight decay 0) says so instead of drawing noise;
- Adam's v and Adamax's u (different quantities, decades apart) get separate axes;
- labels are plain Unicode from `core.figures` (no LaTeX-like markup).
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..core import histogram as hist
from ..core.figures import label
from .relations import RunData, layer_series

#: Most points drawn per trace; longer series are thinned (display only).
MAX_DISPLAY_POINTS = 2000
#: The run colours (Plotly's default qualitative palette), by position in the report.
PALETTE = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880", "#ff97ff", "#fecb52")
_INT_AXIS = {"tickformat": "d"}


def run_color(index: int) -> str:
    """The colour of the run at `index` in every figure of a report."""
    return PALETTE[index % len(PALETTE)]


def thin(x: np.ndarray, *ys: np.ndarray, max_points: int = MAX_DISPLAY_POINTS) -> tuple[np.ndarray, ...]:
    """Every k-th point (first and last kept) so that at most ~`max_points` are drawn."""
    n = len(x)
    if n <= max_points:
        return (x, *ys)
    keep = np.zeros(n, dtype=bool)
    keep[:: math.ceil(n / max_points)] = True
    keep[-1] = True
    return (x[keep], *(y[keep] for y in ys))


def text(value: Any) -> str:
    """A name as Plotly shows it: Plotly renders a subset of HTML in names and labels, so a run
    called '<b>x' must be escaped to be shown as typed."""
    return html.escape(str(value), quote=False)


def _values(a: Any) -> list:
    """JSON-ready list: NaN/inf become None (gaps in the line)."""
    arr = np.asarray(a, dtype=float)
    return [None if not math.isfinite(v) else float(v) for v in arr]


def _line(run_index: int, run: RunData, x, y, *, name: str | None = None, dash: str = "solid", axis: str = "",
          show_legend: bool = False, width: float = 1.6) -> dict:
    x, y = thin(np.asarray(x, float), np.asarray(y, float))
    shown = text(run.label)
    name = text(name) if name else None
    trace = {
        "type": "scattergl" if len(x) > 5000 else "scatter", "mode": "lines", "x": _values(x), "y": _values(y),
        # The legend shows runs (one entry per run, toggling its whole group); hover names the series.
        "name": shown if show_legend else (name or shown), "legendgroup": shown, "showlegend": show_legend,
        "line": {"color": run_color(run_index), "dash": dash, "width": width},
        "hovertemplate": f"{shown}<br>%{{x}}: %{{y:.4g}}<extra>{name or ''}</extra>",
    }
    if axis:
        trace["xaxis"], trace["yaxis"] = "x" + axis, "y" + axis
    return trace


def _layout(title: str, height: int = 380, **extra: Any) -> dict:
    layout = {
        "title": {"text": title, "font": {"size": 15}}, "height": height, "margin": {"l": 70, "r": 20, "t": 50, "b": 50},
        "hovermode": "closest", "legend": {"orientation": "h", "y": -0.2}, "template": None,
        "paper_bgcolor": "white", "plot_bgcolor": "#fafafa",
    }
    layout.update(extra)
    return layout


def _grid(columns: int, titles: Sequence[str], rows: int = 1, gap: float = 0.08) -> dict:
    """Axes of a rows × columns grid (axis 1 is top left), with subplot titles as annotations."""
    out: dict[str, Any] = {"annotations": []}
    width = (1 - gap * (columns - 1)) / columns
    height = (1 - 0.18 * (rows - 1)) / rows
    for i, title in enumerate(titles):
        r, c = divmod(i, columns)
        suffix = "" if i == 0 else str(i + 1)
        x0 = c * (width + gap)
        y1 = 1 - r * (height + 0.18)
        out[f"xaxis{suffix}"] = {"domain": [x0, x0 + width], "anchor": f"y{suffix}"}
        out[f"yaxis{suffix}"] = {"domain": [y1 - height, y1], "anchor": f"x{suffix}"}
        out["annotations"].append({"text": title, "x": x0 + width / 2, "y": y1 + 0.02, "xref": "paper", "yref": "paper",
                                   "showarrow": False, "xanchor": "center", "yanchor": "bottom", "font": {"size": 13}})
    return out


def _axis(index: int) -> str:
    return "" if index == 0 else str(index + 1)


def _positive(values: Sequence[np.ndarray]) -> bool:
    finite = [v[np.isfinite(v)] for v in values]
    finite = [v for v in finite if v.size]
    return bool(finite) and all((v > 0).all() for v in finite)


def figure_losses(runs: Sequence[RunData]) -> dict:
    """Training (solid) and validation (dashed) loss per epoch; accuracy beside it when logged."""
    has_acc = any(c in r.epochs for r in runs for c in ("val_accuracy", "train_accuracy"))
    titles = ["Loss (solid: train, dashed: validation)"] + (["Accuracy"] if has_acc else [])
    layout = _layout("Loss and accuracy", **_grid(len(titles), titles))
    data, drawn = [], []
    for i, r in enumerate(runs):
        first = True
        for col, dash in (("train_loss", "solid"), ("val_loss", "dash")):
            if col in r.epochs and r.epochs[col].notna().any():
                data.append(_line(i, r, r.epochs["epoch"], r.epochs[col], name=f"{r.label} {col}", dash=dash, show_legend=first))
                drawn.append(r.epochs[col].to_numpy(float))
                first = False
        if has_acc:
            for col, dash in (("train_accuracy", "solid"), ("val_accuracy", "dash")):
                if col in r.epochs:
                    data.append(_line(i, r, r.epochs["epoch"], r.epochs[col], name=f"{r.label} {col}", dash=dash, axis="2"))
    layout["xaxis"].update(title="epoch", **_INT_AXIS)
    layout["yaxis"].update(title="loss", type="log" if _positive(drawn) else "linear")
    if has_acc:
        layout["xaxis2"].update(title="epoch", **_INT_AXIS)
        layout["yaxis2"].update(title="accuracy")
    return {"data": data, "layout": layout}


#: Key of a run's hyperparameters under which its task names epoch metrics to draw together (the
#: task's own outcome beside the optimizer's figures):
#: ``[{"title": str, "metrics": {metric column: axis label}}]``.
EPOCH_METRIC_PANELS_KEY = "epoch_metric_panels"


def metric_panels(runs: Sequence[RunData]) -> list[dict]:
    """The distinct metric panels the runs ask for, in first-seen order."""
    panels: list[dict] = []
    for r in runs:
        for panel in r.hyperparameters.get(EPOCH_METRIC_PANELS_KEY) or []:
            if panel not in panels:
                panels.append(panel)
    return panels


def figure_metric_panel(runs: Sequence[RunData], panel: dict) -> dict:
    """One subplot per metric of `panel` (e.g. vertex-finding efficiency and false positives per
    event), one line per run that logged it."""
    metrics = dict(panel.get("metrics") or {})
    titles = [text(label) for label in metrics.values()]
    layout = _layout(text(panel.get("title", "Task metrics")), **_grid(max(len(titles), 1), titles))
    data = []
    for i, r in enumerate(runs):
        first = True
        for j, column in enumerate(metrics):
            if column in r.epochs and r.epochs[column].notna().any():
                data.append(_line(i, r, r.epochs["epoch"], r.epochs[column], name=f"{r.label} {column}",
                                  axis=_axis(j), show_legend=first))
                first = False
    for j, label in enumerate(titles):
        layout[f"xaxis{_axis(j)}"].update(title="epoch", **_INT_AXIS)
        layout[f"yaxis{_axis(j)}"].update(title=label)
    return {"data": data, "layout": layout}


def figure_hyperparameters(runs: Sequence[RunData]) -> dict:
    """Learning rate and weight decay in force at each recorded step (param group 0)."""
    titles = ["Learning rate in force", "Weight decay in force"]
    layout = _layout("Hyperparameters in force", **_grid(2, titles))
    data = []
    values: dict[str, list[np.ndarray]] = {"lr": [], "weight_decay": []}
    for i, r in enumerate(runs):
        for j, col in enumerate(("lr", "weight_decay")):
            frame = r.steps if len(r.steps) and col in r.steps else r.epochs
            if col not in frame or "step" not in frame:
                continue
            data.append(_line(i, r, frame["step"], frame[col], name=f"{r.label} {col}", axis=_axis(j), show_legend=j == 0))
            values[col].append(frame[col].to_numpy(float))
    for j, col in enumerate(("lr", "weight_decay")):
        s = _axis(j)
        layout[f"xaxis{s}"].update(title="optimizer step", **_INT_AXIS)
        finite = np.concatenate(values[col]) if values[col] else np.array([])
        finite = finite[np.isfinite(finite)]
        if finite.size and np.ptp(finite) == 0:
            # A constant (e.g. weight decay 0): a flat line at a fixed, readable range, and the value said.
            v = float(finite[0])
            layout[f"yaxis{s}"].update(title=col, range=[v - 1, v + 1] if v == 0 else [v * 0.5, v * 1.5])
            layout["annotations"][j]["text"] += f" (constant {v:g} in every run)"
        else:
            layout[f"yaxis{s}"].update(title=col, type="log" if col == "lr" and _positive(values[col]) else "linear",
                                       exponentformat="power")
    return {"data": data, "layout": layout}


def figure_epoch_geometry(runs: Sequence[RunData]) -> dict:
    """Epoch step norm, angle between consecutive epoch steps, distance from init, parameter norm."""
    titles = ["Epoch step norm ‖θ_end(k) − θ_end(k−1)‖", "Angle between consecutive epoch steps (degrees)",
              label("distance_from_init"), "Parameter norm ‖θ‖ (epoch mean)"]
    layout = _layout("Epoch geometry", height=640, **_grid(2, titles, rows=2))
    data, norms = [], []
    for i, r in enumerate(runs):
        for j, col in enumerate(("step_norm", "angle_prev_deg", "distance_from_init", "param_norm_mean")):
            if col in r.epochs:
                data.append(_line(i, r, r.epochs["epoch"], r.epochs[col], name=f"{r.label} {col}", axis=_axis(j),
                                  show_legend=j == 0))
                if col == "step_norm":
                    norms.append(r.epochs[col].to_numpy(float))
    for j in range(4):
        layout[f"xaxis{_axis(j)}"].update(title="epoch", **_INT_AXIS)
    layout["yaxis"].update(type="log" if _positive(norms) else "linear", exponentformat="power")
    layout["yaxis2"].update(range=[0, 180], tickvals=[0, 45, 90, 135, 180])
    return {"data": data, "layout": layout}


def _family(run: RunData) -> str:
    name = str(run.info.get("optimizer") or run.hyperparameters.get("optimizer") or "").lower()
    return "adamax" if "adamax" in name else "adam"


def figure_moments(runs: Sequence[RunData]) -> dict:
    """Gradient and first-moment norms; Adam's v and Adamax's u on separate axes; effective lr."""
    families = sorted({_family(r) for r in runs})
    panels = [("grad_norm", "Gradient norm ‖g‖ (epoch mean)"), ("exp_avg_norm", "First moment norm ‖m‖ (epoch mean)")]
    for fam in families:
        what = "u (Adamax's infinity norm)" if fam == "adamax" else "v (Adam's second moment)"
        panels.append((f"second_moment_mean:{fam}", f"{what}, mean element"))
    with_hist = any(len(r.histograms) for r in runs)
    panels.append(("eff_lr_mean", "Effective lr lr/(bc1·(√v̂+ε)): median, dashed 16th/84th percentile (kernel "
                                  "histograms)" if with_hist else
                   "Effective lr lr/(bc1·(√v̂+ε)), mean element (dotted: largest)"))
    columns = 2
    rows = math.ceil(len(panels) / columns)
    layout = _layout("Moments and effective learning rate", height=300 * rows + 40,
                     **_grid(columns, [t for _, t in panels], rows=rows))
    data = []
    drawn: dict[int, list[np.ndarray]] = {}
    for i, r in enumerate(runs):
        for j, (key, _) in enumerate(panels):
            figure, _, fam = key.partition(":")
            if fam and _family(r) != fam:
                continue
            col = f"{figure}_mean"
            if figure == "eff_lr_mean" and len(r.histograms):
                # The mean is dominated by elements whose v is ≈ 0 (lr/ε): the histogram's median is
                # the step size a typical element takes (per epoch: its last histogram step).
                q = epoch_quantiles(r, "eff_lr", (0.5, 0.1587, 0.8413))
                for k, (dash, what) in enumerate((("solid", "median"), ("dash", "p16"), ("dash", "p84"))):
                    data.append(_line(i, r, q["epoch"], q.iloc[:, k + 1], name=f"{r.label} eff_lr {what}", dash=dash,
                                      axis=_axis(j), show_legend=j == 0 and k == 0 and not drawn.get(0)))
                    drawn.setdefault(j, []).append(q.iloc[:, k + 1].to_numpy(float))
                continue
            if col not in r.epochs:
                continue
            data.append(_line(i, r, r.epochs["epoch"], r.epochs[col], name=f"{r.label} {col}", axis=_axis(j),
                              show_legend=j == 0))
            drawn.setdefault(j, []).append(r.epochs[col].to_numpy(float))
            if figure == "eff_lr_mean" and "eff_lr_max_max" in r.epochs:
                data.append(_line(i, r, r.epochs["epoch"], r.epochs["eff_lr_max_max"], name=f"{r.label} eff_lr_max_max",
                                  dash="dot", axis=_axis(j)))
                drawn[j].append(r.epochs["eff_lr_max_max"].to_numpy(float))
    for j in range(len(panels)):
        s = _axis(j)
        layout[f"xaxis{s}"].update(title="epoch", **_INT_AXIS)
        layout[f"yaxis{s}"].update(type="log" if _positive(drawn.get(j, [])) else "linear", exponentformat="power")
    return {"data": data, "layout": layout}


# ---- the kernel's step histograms (histogram_every) --------------------------------------------
#: Kinds in display order, with their axis labels.
HISTOGRAM_KIND_LABELS = {"eff_lr": "effective step size lr/(bc1·(√v̂+ε))", "update_abs": "|Δθ|", "grad_abs": "|g|"}


def step_histograms(run: RunData, kind: str) -> pd.DataFrame:
    """One row per histogram step: step, epoch, and the counts summed over the run's tensors."""
    h = run.histograms
    if not len(h):
        return pd.DataFrame({"step": [], "epoch": [], "counts": []})
    h = h[h["kind"] == kind]
    rows = [(int(step), int(g["epoch"].iloc[0]), np.sum(np.stack(list(g["counts"])), axis=0))
            for step, g in h.groupby("step")]
    return pd.DataFrame(rows, columns=["step", "epoch", "counts"])


def step_quantiles(run: RunData, kind: str, qs: Sequence[float] = tuple(p / 100 for p in hist.TENSORBOARD_PERCENTILES)
                   ) -> pd.DataFrame:
    """Quantiles of |x| per histogram step (all tensors), from the histograms: step, epoch, q<..>."""
    per_step = step_histograms(run, kind)
    out = pd.DataFrame({"step": per_step["step"], "epoch": per_step["epoch"]})
    values = hist.quantiles(np.stack(list(per_step["counts"])), qs) if len(per_step) else np.zeros((0, len(qs)))
    for k, q in enumerate(qs):
        out[f"q{q:g}"] = values[:, k]
    return out


def epoch_quantiles(run: RunData, kind: str, qs: Sequence[float]) -> pd.DataFrame:
    """`step_quantiles` at each epoch's last histogram step: epoch, then one column per q."""
    q = step_quantiles(run, kind, qs)
    return q.sort_values("step").groupby("epoch", as_index=False).last().drop(columns=["step"])


def figure_distributions(runs: Sequence[RunData]) -> dict:
    """TensorBoard's distributions view from the kernel histograms: per step, the median and the
    bands between its percentiles (0–100, 7–93, 16–84, 31–69 %), of every kind, all tensors."""
    kinds = list(HISTOGRAM_KIND_LABELS)
    layout = _layout("Distributions over training (kernel histograms, all tensors)", height=360,
                     **_grid(len(kinds), [f"{HISTOGRAM_KIND_LABELS[k]}" for k in kinds]))
    data = []
    ps = hist.TENSORBOARD_PERCENTILES
    for i, r in enumerate(runs):
        if not len(r.histograms):
            continue
        for j, kind in enumerate(kinds):
            q = step_quantiles(r, kind)
            x = q["step"].to_numpy(float)
            cols = [c for c in q.columns if c.startswith("q")]
            for lo, hi, opacity in ((0, 8, 0.10), (1, 7, 0.15), (2, 6, 0.2), (3, 5, 0.25)):
                band_x = np.concatenate([x, x[::-1]])
                band_y = np.concatenate([q[cols[lo]].to_numpy(float), q[cols[hi]].to_numpy(float)[::-1]])
                band_y = np.where(band_y > 0, band_y, np.nan)  # a log axis has no 0: a zero quantile is a gap
                trace = {"type": "scatter", "mode": "lines", "x": _values(band_x), "y": _values(band_y),
                         "fill": "toself", "fillcolor": run_color(i), "opacity": opacity, "line": {"width": 0},
                         "legendgroup": text(r.label), "showlegend": False, "hoverinfo": "skip",
                         "name": f"{ps[lo]:g}–{ps[hi]:g} %"}
                if j:
                    trace["xaxis"], trace["yaxis"] = "x" + _axis(j), "y" + _axis(j)
                data.append(trace)
            median = np.where(q[cols[4]].to_numpy(float) > 0, q[cols[4]].to_numpy(float), np.nan)
            data.append(_line(i, r, x, median, name=f"{r.label} {kind} median", axis=_axis(j), show_legend=j == 0))
    for j in range(len(kinds)):
        s = _axis(j)
        layout[f"xaxis{s}"].update(title="step", **_INT_AXIS)
        layout[f"yaxis{s}"].update(type="log", exponentformat="power")
    return {"data": data, "layout": layout}


def figure_histograms(run: RunData, kind: str = "eff_lr", max_histograms: int = 30) -> dict:
    """TensorBoard's histogram view: one histogram per step, offset by step, oldest at the back.

    x is log2 |x| (the kernel's bins, one unit wide); each curve is the fraction of elements per
    bin, scaled so the tallest bin of the run reaches three offsets. At most `max_histograms`
    steps are drawn (evenly spaced, the last one included); zeros and NaN/inf are in the hover.
    """
    per_step = step_histograms(run, kind)
    layout = _layout(f"{run.label}: histograms of the {HISTOGRAM_KIND_LABELS[kind]} over training", height=460,
                     showlegend=False)
    layout["xaxis"] = {"title": "log2 |x| (bin lower edge)", "zeroline": False}
    layout["yaxis"] = {"title": "step", "showgrid": False}
    if not len(per_step):
        return {"data": [], "layout": layout}
    picks = np.unique(np.linspace(0, len(per_step) - 1, min(max_histograms, len(per_step))).round().astype(int))
    counts = np.stack(list(per_step["counts"]))[picks].astype(float)
    steps = per_step["step"].to_numpy()[picks]
    exp_bins = slice(hist.UNDERFLOW_BIN, hist.OVERFLOW_BIN + 1)
    used = np.nonzero(counts[:, exp_bins].sum(axis=0))[0]
    if not used.size:
        return {"data": [], "layout": layout}
    lo, hi = used[0] + hist.UNDERFLOW_BIN, used[-1] + hist.UNDERFLOW_BIN
    x = np.arange(lo, hi + 1) - hist.FIRST_EXPONENT_BIN + hist.MIN_EXPONENT
    totals = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    spacing = (steps[-1] - steps[0]) / max(len(steps) - 1, 1) if len(steps) > 1 else 1.0
    scale = 3 * spacing / max(frac[:, lo : hi + 1].max(), 1e-12)
    data = []
    for k in range(len(steps) - 1, -1, -1):  # the oldest drawn last, so it is at the back
        base = float(steps[k])
        y = base + frac[k, lo : hi + 1] * scale
        shade = 0.25 + 0.75 * k / max(len(steps) - 1, 1)
        data.append({
            "type": "scatter", "mode": "lines", "x": _values(np.concatenate([x, x[::-1]])),
            "y": _values(np.concatenate([y, np.full_like(y, base)])), "fill": "toself",
            "fillcolor": f"rgba(255,112,67,{0.15 + 0.5 * shade:.2f})", "line": {"color": "#bf360c", "width": 0.8},
            "name": f"step {int(steps[k])}",
            "hovertemplate": (f"step {int(steps[k])}<br>2^%{{x}}: %{{text}}<extra>zeros {int(counts[k, 0])}, "
                              f"nan/inf {int(counts[k, hist.NONFINITE_BIN])}</extra>"),
            "text": [f"{v:.3g}" for v in np.concatenate([frac[k, lo : hi + 1], np.zeros(hi - lo + 1)])],
        })
    return {"data": data, "layout": layout}


def figure_step_figures(runs: Sequence[RunData]) -> dict:
    """Update/parameter ratio, cos(update, gradient) and cos(update, previous epoch step)."""
    panels = ("update_to_param", "cos_update_grad", "cos_update_prev_epoch")
    layout = _layout("Update size and direction (epoch means)", **_grid(3, [label(p) for p in panels], gap=0.06))
    data, ratios = [], []
    for i, r in enumerate(runs):
        for j, figure in enumerate(panels):
            col = f"{figure}_mean"
            if col in r.epochs:
                data.append(_line(i, r, r.epochs["epoch"], r.epochs[col], name=f"{r.label} {col}", axis=_axis(j),
                                  show_legend=j == 0))
                if j == 0:
                    ratios.append(r.epochs[col].to_numpy(float))
    for j in range(3):
        layout[f"xaxis{_axis(j)}"].update(title="epoch", **_INT_AXIS)
    layout["yaxis"].update(type="log" if _positive(ratios) else "linear", exponentformat="power")
    layout["yaxis2"].update(range=[-1.05, 1.05])
    layout["yaxis3"].update(range=[-1.05, 1.05])
    return {"data": data, "layout": layout}


def signed_log_ticks(values: np.ndarray, scale: float, min_gap: float = 0.9) -> tuple[list[float], list[str]]:
    """Tick positions (in asinh(y/scale) units) and labels for a signed-log axis: 0, then ±10^k
    for the decades the data spans, dropping ticks closer than `min_gap` to one already kept so
    that labels near 0 never collide."""
    v = np.abs(values[np.isfinite(values) & (values != 0)])
    if not v.size:
        return [0.0], ["0"]
    lo, hi = math.floor(math.log10(max(v.min(), scale))), math.ceil(math.log10(v.max()))
    positions, labels = [0.0], ["0"]
    for k in range(lo, hi + 1):
        t = math.asinh(10.0 ** k / scale)
        if all(abs(t - p) >= min_gap for p in positions if p >= 0):
            for sign in (1, -1):
                positions.append(sign * t)
                labels.append(("−" if sign < 0 else "") + f"1e{k}")
    return positions, labels


def figure_predicted_vs_actual(runs: Sequence[RunData]) -> dict:
    """Σ⟨Δθ, g⟩ over each epoch (first-order prediction) against the actual training-loss change,
    on a signed-log axis asinh(y / scale), scale = 10⁻³ × the largest change."""
    values = [r.epochs[c].to_numpy(float) for r in runs for c in ("predicted_loss_change", "train_loss_change") if c in r.epochs]
    allv = np.concatenate(values) if values else np.array([])
    finite = np.abs(allv[np.isfinite(allv) & (allv != 0)])
    scale = float(finite.max()) * 1e-3 if finite.size else 1.0
    ticks, labels = signed_log_ticks(allv, scale)
    titles = ["Predicted (solid) and actual (dashed) Δ train loss", "Actual against predicted (dotted: y = x)"]
    layout = _layout("Predicted versus actual loss change (signed-log axes)", **_grid(2, titles))
    data = []
    for i, r in enumerate(runs):
        e = r.epochs
        if "predicted_loss_change" not in e or "train_loss_change" not in e:
            continue
        p = np.arcsinh(e["predicted_loss_change"].to_numpy(float) / scale)
        a = np.arcsinh(e["train_loss_change"].to_numpy(float) / scale)
        data.append(_line(i, r, e["epoch"], p, name=f"{r.label} predicted", show_legend=True))
        data.append(_line(i, r, e["epoch"], a, name=f"{r.label} actual", dash="dash"))
        x, y, ep = thin(p, a, e["epoch"].to_numpy(float))
        data.append({"type": "scatter", "mode": "markers", "x": _values(x), "y": _values(y), "xaxis": "x2", "yaxis": "y2",
                     "legendgroup": text(r.label), "showlegend": False, "name": text(r.label),
                     "text": [str(int(k)) for k in ep], "marker": {"color": run_color(i), "size": 5, "opacity": 0.7},
                     "hovertemplate": f"{text(r.label)} epoch %{{text}}<extra></extra>"})
    lim = max(ticks) * 1.1 if ticks else 1
    data.append({"type": "scatter", "mode": "lines", "x": [-lim, lim], "y": [-lim, lim], "xaxis": "x2", "yaxis": "y2",
                 "line": {"color": "#888", "dash": "dot", "width": 1}, "showlegend": False, "hoverinfo": "skip"})
    layout["xaxis"].update(title="epoch", **_INT_AXIS)
    for axis in ("yaxis", "xaxis2", "yaxis2"):
        layout[axis].update(tickvals=ticks, ticktext=labels)
    layout["yaxis"]["title"] = "loss change"
    layout["xaxis2"]["title"] = "predicted Σ⟨Δθ, g⟩"
    layout["yaxis2"]["title"] = "actual Δ train loss"
    return {"data": data, "layout": layout}


def layer_values(run: RunData, figure: str = "step_norm", norm: str = "rms") -> pd.DataFrame:
    """Per-layer epoch figure, wide (epochs × layers); ``norm="rms"`` divides a norm by √numel
    (per-element RMS), so that the view does not just rank the tensors by their size."""
    wide = layer_series(run.layers, figure)
    if norm == "rms" and not wide.empty and "numel" in run.layers:
        numel = run.layers.drop_duplicates("layer").set_index("layer")["numel"].reindex(wide.columns).to_numpy(float)
        wide = wide / np.sqrt(numel)
    return wide


def figure_layers(run: RunData, norm: str = "rms") -> dict:
    """Per-layer epoch step norms: a heatmap (log colour) and one line per layer (toggle in the legend)."""
    wide = layer_values(run, "step_norm", norm)
    what = "per-element RMS ‖s_k‖/√numel" if norm == "rms" else "‖s_k‖"
    titles = [f"Heatmap of log10 {what}", f"{what} per layer (click a layer to hide it)"]
    layout = _layout(f"{text(run.label)}: per-layer epoch step ({what})", height=max(420, 120 + 22 * wide.shape[1]),
                     **_grid(2, titles, gap=0.12))
    if wide.empty:
        return {"data": [], "layout": layout}
    epochs = wide.index.to_numpy(float)
    values = wide.to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        logged = np.where(values > 0, np.log10(values), np.nan)
    stride = max(1, math.ceil(len(epochs) / MAX_DISPLAY_POINTS))
    data = [{
        "type": "heatmap", "x": _values(epochs[::stride]), "y": [text(c) for c in wide.columns],
        "z": [_values(row) for row in logged[::stride].T], "colorscale": "Viridis",
        "colorbar": {"title": {"text": "log10"}, "x": 0.44, "len": 0.9}, "hovertemplate": "%{y}<br>epoch %{x}: 10^%{z:.2f}<extra></extra>",
    }]
    for j, layer in enumerate(wide.columns):
        x, y = thin(epochs, values[:, j])
        data.append({"type": "scatter", "mode": "lines", "x": _values(x), "y": _values(y), "name": text(layer),
                     "xaxis": "x2", "yaxis": "y2", "line": {"color": PALETTE[j % len(PALETTE)], "width": 1.3},
                     "hovertemplate": f"{text(layer)}<br>epoch %{{x}}: %{{y:.4g}}<extra></extra>"})
    layout["xaxis"].update(title="epoch", **_INT_AXIS)
    layout["yaxis"].update(autorange="reversed", automargin=True)
    layout["xaxis2"].update(title="epoch", **_INT_AXIS)
    layout["yaxis2"].update(type="log" if _positive([values]) else "linear", exponentformat="power")
    layout["legend"] = {"x": 1.02, "y": 1, "orientation": "v", "font": {"size": 10}}
    return {"data": data, "layout": layout}


__all__ = [
    "MAX_DISPLAY_POINTS", "PALETTE", "run_color", "thin", "signed_log_ticks", "layer_values",
    "figure_losses", "figure_hyperparameters", "figure_epoch_geometry", "figure_moments", "figure_step_figures",
    "figure_predicted_vs_actual", "figure_layers",
]
