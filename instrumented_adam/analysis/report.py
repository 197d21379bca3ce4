"""The self-contained HTML report of one or more recorded runs.

    from instrumented_adam.report import write_report
    write_report("runs/exp.sqlite", "runs/exp.html")              # every run of the store
    write_report("runs/exp.sqlite", "cmp.html", runs=["a", "b"])  # some runs, overlaid

The report is one HTML file: interactive Plotly figures (plotly.js inlined once, from
``plotly.offline.get_plotlyjs()``: zoom, hover values, a click on a run or a layer in a legend
toggles it), the loss-surface path as an embedded PNG, inline styles; nothing is fetched, so it
opens offline and can be mailed or archived next to the store. It opens with each run's health
findings in plain words (`analysis.health`), and its relation tables are the detrended,
autocorrelation-aware tests of `analysis.significance` against the validation-loss change. Runs are
grouped for overlaying by their demo task (``hyperparameters["task"]``) — runs of other
programs form one group — so that a linear regression is not drawn on the axes of a classifier.
`docs/report.md` explains how to read each figure.

A small inline script checks, once the page has loaded, that every image decoded, that every
Plotly figure rendered, and that no script error occurred; it records the outcome on
``<body data-report-check="ok|failed" ...>`` (tests read it from Chromium's DOM dump) and shows
a banner when something failed to load. Opened with ``#selftest``, the page also clicks the first
run in the first figure's legend and zooms that figure, and records what happened
(``data-selftest-*``), so a test can check the interactions in headless Chromium.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .. import __version__
from . import health, interactive, plots
from .relations import RunData, load_runs, relations
from .significance import DETREND_METHODS, rank_tests
from ..telemetry.store import RunStore

#: Resolution of embedded figures (a 10-inch figure is 1000 px wide).
DPI = 100


def figure_to_data_uri(fig: Figure, dpi: int = DPI) -> str:
    """A figure as a ``data:image/png;base64,...`` URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure_html(fig: Figure, caption: str, alt: str) -> str:
    return (
        f'<figure><img src="{figure_to_data_uri(fig)}" alt="{html.escape(alt)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _fmt(value: Any, digits: int = 4) -> str:
    """A compact number for tables: 4 significant digits, '–' for missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (bool, str)):
        return html.escape(str(value))
    try:
        if pd.isna(value):
            return "–"
    except (TypeError, ValueError):
        pass
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e6):
        return str(int(value))
    return f"{value:.{digits}g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _last(run: RunData, column: str) -> Any:
    if column not in run.epochs or run.epochs.empty:
        return None
    values = run.epochs[column].dropna()
    return values.iloc[-1] if len(values) else None


def _start_lr(r: RunData) -> Any:
    """The lr the run was configured with: a warm-up's first step shows a fraction of it, so the
    optimizer config's ``initial_lr`` (set by torch's schedulers) or ``lr`` comes first."""
    config = r.info.get("optimizer_config")
    if isinstance(config, list) and config and isinstance(config[0], dict):
        for key in ("initial_lr", "lr"):
            if isinstance(config[0].get(key), (int, float)):
                return config[0][key]
    if r.hyperparameters.get("lr") is not None:
        return r.hyperparameters["lr"]
    return r.steps.iloc[0].get("lr") if len(r.steps) else None


def _steps_ran(r: RunData) -> Any:
    """Steps this run ran itself: a branch starts at its branch step, not at 0."""
    last = _last(r, "step")
    start = r.info.get("branch_step")
    if last is None:
        return None
    try:
        return int(last) - (0 if start is None or pd.isna(start) else int(start))
    except (TypeError, ValueError):
        return last


def _status(r: RunData) -> str:
    status = str(r.info.get("status", ""))
    detail = r.info.get("status_detail") or r.info.get("detail")
    return html.escape(status + (f" ({detail})" if isinstance(detail, str) and detail else ""))


def runs_table(runs: Sequence[RunData]) -> str:
    """The overview table: one row per run with settings, lineage and final metrics."""
    rows = []
    for i, r in enumerate(runs):
        info, hp = r.info, r.hyperparameters
        parent = info.get("parent_run")
        lineage = "–" if parent is None or pd.isna(parent) else f"run {int(parent)}, epoch {_fmt(info.get('branch_epoch'))}"
        betas = (r.steps.iloc[0].get("beta1"), r.steps.iloc[0].get("beta2")) if len(r.steps) else tuple(hp.get("betas") or (None, None))
        swatch = f'<span class="swatch" style="background:{_css_color(i)}"></span>'
        rows.append([
            swatch + html.escape(r.label),
            html.escape(str(info.get("optimizer") or hp.get("optimizer") or "?")),
            _fmt(_start_lr(r)),
            _fmt(_last(r, "weight_decay")),
            ", ".join(_fmt(b) for b in betas),
            str(len(r.epochs)),
            _fmt(_steps_ran(r)),
            _fmt(_last(r, "train_loss")),
            _fmt(_last(r, "val_loss")),
            _fmt(_last(r, "val_accuracy")),
            lineage,
            _status(r),
        ])
    header = ["run", "optimizer", "lr (start)", "weight decay", "β1, β2", "epochs", "steps",
              "train loss", "val loss", "val acc", "branched from", "status"]
    note = ('<p class="note">Losses and accuracy: the last epoch with a finite value (the health findings say when a '
            "loss went non-finite). lr (start): the configured lr, before any warm-up. steps: the steps the run ran "
            "itself (a branch counts from its branch point).</p>")
    return '<div class="wide">' + _table(header, rows, "runs") + "</div>" + note


def health_section(results: Sequence[health.RunHealth]) -> str:
    """The report's opening: each run's findings in plain words, errors first."""
    parts = ['<h2 id="health">Health</h2>', '<ul class="health">']
    for h in results:
        worst = h.worst()
        verdict = {"error": "unhealthy", "warning": "worth a look", "info": "healthy", "ok": "healthy"}[worst]
        sentences = health.summary_sentences(h)
        body = "; ".join(html.escape(t) for t in sentences) if sentences else "no findings"
        parts.append(f'<li class="sev-{worst}"><b>{html.escape(h.label)}</b> ({html.escape(h.status)}): '
                     f"<b>{verdict}</b> — {body}.</li>")
    parts.append("</ul>")
    return "\n".join(parts)


def _css_color(index: int) -> str:
    return interactive.run_color(index)


def ranked_table(ranked: pd.DataFrame) -> str:
    """The ranked relation tests (`analysis.relations`) as an HTML table."""
    rows = []
    for _, row in ranked.iterrows():
        rows.append([
            html.escape(row["label"]),
            html.escape(row["layer"] or "all"),
            html.escape(str(row["target"]).replace("_loss_change", " loss Δ")),
            str(int(row["lag"])),
            str(int(row["n"])),
            _fmt(row["r"], 2),
            f"{_fmt(row['ci_low'], 2)} … {_fmt(row['ci_high'], 2)}",
            _fmt(row["n_eff"], 3),
            _fmt(row["p"], 2),
            _fmt(row["q"], 2),
            _fmt(row["oos_gain"], 2),
            _fmt(row["naive_p"], 2),
        ])
    header = ["figure", "layer", "target", "lag", "n", "r (detrended)", "95% CI", "n_eff", "p", "q (BH)",
              "out-of-sample gain", "naive p"]
    return '<div class="wide">' + _table(header, rows, "ranked") + "</div>"


_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0 auto; max-width: 1060px;
       padding: 0 16px 48px; color: #1d1d1f; line-height: 1.45; }
h1 { margin-top: 24px; font-size: 1.6em; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; }
h3 { margin-top: 26px; }
figure { margin: 16px 0; } figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.88em; color: #555; margin-top: 4px; }
table { border-collapse: collapse; font-size: 0.82em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f4f4f6; } td:first-child, th:first-child { text-align: left; }
.meta { color: #666; font-size: 0.9em; } .note { font-size: 0.88em; color: #555; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; border-radius: 2px; }
#load-warning { display: none; background: #fde2e1; border: 1px solid #e0443e; padding: 8px 12px; margin: 12px 0; }
nav ul { columns: 2; font-size: 0.92em; } .wide { overflow-x: auto; max-width: 100%; }
.plot { width: 100%; margin: 12px 0 4px; } table.runs td:last-child { white-space: normal; min-width: 6em; } ul.health li { margin: 4px 0; }
.sev-error { color: #a4161a; } .sev-warning { color: #8a5a00; }
"""

# Runs before anything else: collects script errors so that the load check can report them.
_HEAD_SCRIPT = """
window.__reportErrors = [];
window.addEventListener('error', function (e) { window.__reportErrors.push(String(e.message || e.type)); }, true);
"""

# After load: did every image decode and every Plotly figure render, and were there errors?
# Recorded on <body> for tests (Chromium --dump-dom) and shown to a reader as a banner when
# something went wrong. With #selftest: click the first legend entry of the first figure and zoom
# it with a mouse drag, then record what plotly did (data-selftest-*).
_CHECK_SCRIPT = """
(function () {
  function record(name, value) { document.body.setAttribute(name, String(value)); }
  function check() {
    var images = Array.prototype.slice.call(document.images);
    var loaded = images.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
    var plots = Array.prototype.slice.call(document.querySelectorAll('div.plot'));
    var rendered = plots.filter(function (d) { return d._fullLayout && d.querySelector('.main-svg'); }).length;
    var errors = window.__reportErrors || [];
    var ok = loaded === images.length && rendered === plots.length && errors.length === 0;
    record('data-images-total', images.length); record('data-images-loaded', loaded);
    record('data-plots-total', plots.length); record('data-plots-rendered', rendered);
    record('data-js-errors', errors.length); record('data-report-check', ok ? 'ok' : 'failed');
    if (!ok) {
      var warning = document.getElementById('load-warning');
      warning.textContent = 'Some figures did not load (' + loaded + ' of ' + images.length + ' images, ' + rendered +
        ' of ' + plots.length + ' interactive figures)' + (errors.length ? '; script errors: ' + errors.join('; ') : '') + '.';
      warning.style.display = 'block';
    }
    if (window.location.hash === '#selftest') { selftest(plots[0]); }
  }
  function mouse(target, type, x, y) {
    target.dispatchEvent(new MouseEvent(type, {bubbles: true, cancelable: true, clientX: x, clientY: y, buttons: 1, view: window}));
  }
  function selftest(plot) {
    if (!plot) { record('data-selftest', 'no figure'); return; }
    var toggle = plot.querySelector('.legendtoggle');
    var box = toggle.getBoundingClientRect();
    mouse(toggle, 'mousedown', box.left + 5, box.top + 5); mouse(toggle, 'mouseup', box.left + 5, box.top + 5);
    setTimeout(function () {
      record('data-selftest-toggled', plot.data[0].visible);
      var before = plot._fullLayout.xaxis.range.slice();
      var drag = plot.querySelector('.nsewdrag');
      var r = drag.getBoundingClientRect();
      var x0 = r.left + r.width * 0.3, x1 = r.left + r.width * 0.6, y0 = r.top + r.height * 0.3, y1 = r.top + r.height * 0.7;
      mouse(drag, 'mousedown', x0, y0); mouse(document, 'mousemove', (x0 + x1) / 2, (y0 + y1) / 2);
      mouse(document, 'mousemove', x1, y1); mouse(document, 'mouseup', x1, y1);
      setTimeout(function () {
        var after = plot._fullLayout.xaxis.range;
        record('data-selftest-xrange-before', before.join(','));
        record('data-selftest-xrange-after', after.join(','));
        record('data-selftest', 'done');
      }, 500);
    }, 800);
  }
  if (document.readyState === 'complete') { check(); } else { window.addEventListener('load', check); }
})();
"""

#: Plotly's options for every figure: no link to plotly's cloud, a PNG download button kept.
_PLOT_CONFIG = {"displaylogo": False, "responsive": True, "showLink": False}


class _Figures:
    """Numbers the figure divs of a page and writes the ``Plotly.newPlot`` call of each."""

    def __init__(self) -> None:
        self.count = 0

    def div(self, spec: dict, caption: str, alt: str) -> str:
        self.count += 1
        name = f"plot-{self.count}"
        payload = json.dumps(spec, separators=(",", ":"), allow_nan=False, ensure_ascii=False).replace("</", "<\\/")
        config = json.dumps(_PLOT_CONFIG)
        return (f'<figure><div class="plot" id="{name}" aria-label="{html.escape(alt)}"></div>'
                f"<figcaption>{caption}</figcaption></figure>"
                f"<script>(function(){{var s={payload};Plotly.newPlot('{name}',s.data,s.layout,{config});}})();</script>")


_CAPTIONS = {
    "losses": "Training (solid) and validation (dashed) loss at each epoch end; accuracy when logged.",
    "hyper": "Learning rate and weight decay in force at every recorded step (param group 0): what a "
             "schedule or an lr rule actually set.",
    "clipped": "The gradient figures are those of the gradient the optimizer received: with gradient clipping "
               "(a flat gradient norm at the clip value) they show the clipped gradient, not the raw one.",
    "epoch_steps": "Left: size of each epoch's step ‖θ_end(k) − θ_end(k−1)‖. Right: angle between consecutive "
                   "epoch steps — below 90° the epochs keep heading the same way (room for a larger lr), near or "
                   "above 90° they zig-zag or turn back.",
    "distance": "How far the parameters have moved from where instrumentation began, and their norm.",
    "moments": "Epoch means of the per-step figures. Adam's v and Adamax's u are different quantities and get "
               "separate panels. The effective lr is the per-element step size lr/(bc1·(√v̂+ε)): its mean (line) is "
               "dominated by elements whose second moment is ≈ 0, so read it with its largest element (dotted) in mind.",
    "geometry": "Top: size of each epoch's step ‖θ_end(k) − θ_end(k−1)‖ and the angle between consecutive epoch steps "
                "(below 90°: the epochs keep heading the same way; near or above 90°: they zig-zag or turn back). "
                "Bottom: distance from where instrumentation began, and the parameter norm.",
    "step_figures": "Relative update size ‖Δθ‖/‖θ‖ (10⁻³ is a common rule of thumb), the cosine of the update with "
                    "the gradient (negative: a descent step) and with the previous epoch's step.",
    "predicted": "Σ⟨Δθ, g⟩ over the epoch's steps is the first-order prediction of the training-loss change; "
                 "the actual change is measured between epoch ends. Points far above y = x show curvature or noise "
                 "eating the predicted decrease.",
    "trajectory": "The parameters at each epoch end over the contours of the training loss (computed exactly from "
                  "the stored data moments).",
    "parameters": "The two parameters over training; dashed: the least-squares solution (numpy.linalg.lstsq).",
    "layers": "Per-layer size of each epoch's step: which layers still move and which have settled. Per-element RMS "
              "(‖s_k‖/√numel, the default) compares tensors of different sizes; --layer-norm raw shows ‖s_k‖.",
}


def _relations_html(r: RunData, settings: dict, top: int) -> str:
    lags = range(settings["lags"][0], settings["lags"][1] + 1)
    table = relations(r.epochs, target=settings["target"], lags=lags, window=settings["window"], layers=r.layers,
                      permutations=settings["permutations"])
    if table.empty:
        return ('<p class="note">Too few epochs with a logged loss to test relations (at least 12 pairs are needed, '
                "inside the epoch window).</p>")
    target = {"val": "validation loss", "train": "training loss", "both": "validation and training loss"}.get(
        settings["target"], settings["target"])
    found = int((table["q"] < 0.05).sum())
    floor = 1 / (1 + settings["permutations"])
    window = settings["window"]
    where = "" if window is None else f", epochs {window[0] if window[0] is not None else 'first'}…{window[1] if window[1] is not None else 'last'}"
    head = (f"<p><b>Relations to the change of the {target}</b> ({len(table)} figure × lag tests, lags "
            f"{lags.start}…{lags.stop - 1}{where}; {found} with q &lt; 0.05). Method: {DETREND_METHODS['log-trend']}, "
            f"both series; p from a block permutation of the figure ({settings['permutations']} shuffles, so p ≥ "
            f"{floor:.1g}) or Student's t with the effective sample size n_eff, whichever is larger; q: "
            "Benjamini–Hochberg over the table; out-of-sample gain: 1 − MSE with the figure / MSE from the target's own "
            "last two values (rolling origin, > 0 helps). The naive p (Spearman of the raw series) is shown for "
            "contrast: it counts the shared trend as evidence.</p>")
    return head + ranked_table(rank_tests(table, top=top))


_HISTOGRAM_CAPTIONS = {
    "distributions": "From the per-tensor log2 histograms the kernel counted on the steps the optimizer was asked for "
                     "(histogram_every), summed over tensors: the median (line) and the bands between the 0/7/16/31 "
                     "and 69/84/93/100th percentiles, as TensorBoard's distributions view draws them. Percentiles are "
                     "interpolated inside a power-of-two bin, so each is within one bin (a factor of 2) of the exact "
                     "one. The effective step size's median is what a typical element moves per unit of m; its mean "
                     "is dominated by elements with v ≈ 0.",
    "histograms": "The histogram of the effective step size at each histogram step (TensorBoard's histogram view, "
                  "offset by step, newest in front); x is log2 of the value, one kernel bin per unit.",
}


def _is_clipped(runs: Sequence[RunData]) -> bool:
    """Whether a run's gradient norm sits at a constant ceiling (clipping) for much of training."""
    for r in runs:
        if "grad_norm_max" in r.epochs and len(r.epochs) >= 5:
            top = r.epochs["grad_norm_max"].to_numpy(float)
            top = top[np.isfinite(top)]
            if top.size >= 5 and (np.abs(top - top.max()) <= 1e-6 * top.max()).mean() > 0.5 and top.max() > 0:
                return True
        if r.hyperparameters.get("max_grad_norm") or r.hyperparameters.get("clip_grad_norm"):
            return True
    return False


def _group_section(name: str, runs: Sequence[RunData], settings: dict, top: int, detail_runs: int, anchor: str,
                   figures: _Figures, progress) -> str:
    # The demo layer stores its task's description with the run; this layer never imports it.
    description = runs[0].hyperparameters.get("task_description") if runs else None
    title = f"{name}: {description}" if description else name
    parts = [f'<h2 id="{anchor}">{html.escape(title)}</h2>']
    parts.append(f'<p class="note">{len(runs)} run(s) overlaid (click a run in a legend to hide it, double-click to '
                 "show it alone; drag to zoom, double-click the plot to reset): " + ", ".join(
        f'<span class="swatch" style="background:{_css_color(i)}"></span>{html.escape(r.label)}' for i, r in enumerate(runs)
    ) + "</p>")
    moments_caption = _CAPTIONS["moments"] + (" " + _CAPTIONS["clipped"] if _is_clipped(runs) else "")
    specs = [
        (lambda: interactive.figure_losses(runs), _CAPTIONS["losses"], "loss curves"),
        (lambda: interactive.figure_hyperparameters(runs), _CAPTIONS["hyper"], "learning rate and weight decay"),
        (lambda: interactive.figure_epoch_geometry(runs), _CAPTIONS["geometry"], "epoch geometry"),
        (lambda: interactive.figure_moments(runs), moments_caption, "moment norms and effective lr"),
        (lambda: interactive.figure_step_figures(runs), _CAPTIONS["step_figures"], "update to parameter ratio and cosines"),
        (lambda: interactive.figure_predicted_vs_actual(runs), _CAPTIONS["predicted"], "predicted versus actual loss change"),
    ]
    if any(len(r.histograms) for r in runs):  # the kernel's histograms (histogram_every)
        specs.insert(4, (lambda: interactive.figure_distributions(runs), _HISTOGRAM_CAPTIONS["distributions"],
                         "distributions of the effective step size, update and gradient over training"))
    for panel in interactive.metric_panels(runs):  # the task's own outcome, next to the loss
        specs.insert(1, (lambda panel=panel: interactive.figure_metric_panel(runs, panel),
                         "The task's own figures of merit at each epoch end, as the task recorded them.",
                         str(panel.get("title", "task metrics"))))
    for make, caption, alt in specs:
        parts.append(figures.div(make(), caption, alt))
        progress.update()
    if plots.surface_runs(runs):
        parts.append(_figure_html(plots.plot_trajectory(runs, [_css_color(i) for i in range(len(runs))]),
                                  _CAPTIONS["trajectory"], "trajectory on the loss surface"))
        parts.append(_figure_html(plots.plot_parameters(runs, [_css_color(i) for i in range(len(runs))]),
                                  _CAPTIONS["parameters"], "parameters over training"))
    for r in runs[:detail_runs]:
        parts.append(f"<h3>{html.escape(r.label)}</h3>")
        if len(r.layers):
            parts.append(figures.div(interactive.figure_layers(r, settings["layer_norm"]), _CAPTIONS["layers"],
                                     f"per-layer step norms of {r.label}"))
        if len(r.histograms):
            parts.append(figures.div(interactive.figure_histograms(r, "eff_lr"), _HISTOGRAM_CAPTIONS["histograms"],
                                     f"histograms of the effective step size of {r.label}"))
        parts.append(_relations_html(r, settings, top))
        progress.update()
    if len(runs) > detail_runs:
        parts.append(f'<p class="note">Per-run details shown for the first {detail_runs} of {len(runs)} runs '
                     "(report fewer runs, or raise detail_runs, to see the others).</p>")
    return "\n".join(parts)


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


#: Decisions that changed something, shown per run in the report (the rest are counted).
LR_DECISION_ROWS = 25


def lr_decisions_section(decisions: pd.DataFrame, runs: Sequence[RunData]) -> str:
    """The learning-rate rules' decisions of the shown runs: counts per action, then the changes.

    A change is a decision whose lr after differs from the lr before, or that moved the
    parameters (an extrapolation's jump, a rollback); holds are only counted.
    """
    labels = {r.run_id: r.label for r in runs}
    shown = decisions[decisions["run_id"].isin(list(labels))]
    if not len(shown):
        return ""
    parts = ['<h2 id="lr-decisions">Learning-rate decisions</h2>',
             '<p class="note">What each learning-rate rule saw and did (core.lr_rules): the figure that '
             "triggered the decision, its value, and the lr before and after. Per-step rules are summarised per "
             "epoch (the mean of their figure). docs/lr-rules.md defines the rules.</p>"]
    for run_id, rows in shown.groupby("run_id", sort=True):
        counts = rows["action"].value_counts()
        summary = ", ".join(f"{html.escape(str(a))} {int(n)}" for a, n in counts.items())
        parts.append(f"<h3>{html.escape(labels[run_id])}: {html.escape(', '.join(rows['rule'].unique()))}</h3>"
                     f"<p>{summary}</p>")
        changes = rows[(rows["lr_after"] != rows["lr_before"]) | rows["action"].isin(["jump", "rollback"])]
        table_rows = []
        for _, d in changes.head(LR_DECISION_ROWS).iterrows():
            detail = d["detail"] if isinstance(d["detail"], dict) else {}
            extra = f" (α = {_fmt(detail['alpha'])})" if "alpha" in detail else ""
            table_rows.append([_fmt(int(d["epoch"])), _fmt(int(d["step"])), html.escape(str(d["action"])) + extra,
                               _fmt(d["lr_before"]), _fmt(d["lr_after"]), html.escape(str(d["figure"])),
                               _fmt(d["value"])])
        if table_rows:
            parts.append(_table(["epoch", "step", "action", "lr before", "lr after", "figure", "value"], table_rows))
        if len(changes) > LR_DECISION_ROWS:
            parts.append(f'<p class="note">First {LR_DECISION_ROWS} of {len(changes)} changes shown.</p>')
    return "\n".join(parts)


def build_report(
    store: RunStore | str | Path,
    runs: Sequence[int | str] | None = None,
    *,
    title: str | None = None,
    lags: tuple[int, int] = (0, 3),
    max_lag: int | None = None,
    target: str = "val",
    window: tuple[int | None, int | None] | None = None,
    layer_norm: str = "rms",
    permutations: int = 999,
    top: int = 15,
    detail_runs: int = 8,
    progress: bool = False,
) -> str:
    """The report's HTML for `runs` of `store` (all runs when None or empty).

    Args:
        store: a `RunStore` or the path of one.
        runs: run ids or names.
        title: the page title (default: the store's file name).
        lags: (first, last) lag in epochs of the loss relations; `max_lag` is shorthand for (0, max_lag).
        target: the loss whose change the relations predict: 'val' (default), 'train' or 'both'.
        window: (first, last) epoch of the relations, inclusive (None: every epoch).
        layer_norm: per-layer view of 'rms' (‖s_k‖/√numel, default) or 'raw' ‖s_k‖.
        permutations: block permutations per relation test.
        top: rows of each run's ranked relation table.
        detail_runs: runs per group that get a per-layer view and relation tests.
        progress: a progress bar on stderr (tqdm) while the report builds.
    """
    if max_lag is not None:
        lags = (0, max_lag)
    if layer_norm not in ("rms", "raw"):
        raise ValueError(f"layer_norm must be 'rms' or 'raw', got {layer_norm!r}")
    settings = {"lags": tuple(lags), "target": target, "window": window, "layer_norm": layer_norm,
                "permutations": permutations}
    owned = not isinstance(store, RunStore)
    store_obj = RunStore(store) if owned else store
    try:
        data = load_runs(store_obj, runs)
        path = store_obj.path
        decisions = store_obj.lr_decisions()
    finally:
        if owned:
            store_obj.close()
    title = title or f"instrumented_adam report: {path.name}"
    groups: dict[str, list[RunData]] = {}
    for r in data:
        groups.setdefault(r.group, []).append(r)
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">Store <code>{html.escape(str(path))}</code> · {len(data)} run(s) · generated '
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by instrumented_adam {__version__}</p>",
        '<div id="load-warning"></div>',
    ]
    figures = _Figures()
    if not data:
        body.append("<p>The store holds no runs yet.</p>")
    else:
        total = sum(6 + min(len(rs), detail_runs) for rs in groups.values())
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="report", unit="figure", file=sys.stderr, leave=False)
        else:
            bar = _NoProgress()
        try:
            body.append(health_section([health.diagnose(r) for r in data]))
            anchors = {name: f"group-{i}" for i, name in enumerate(groups)}
            body.append("<nav><ul>" + "".join(f'<li><a href="#{anchors[g]}">{html.escape(g)}</a> ({len(rs)} runs)</li>'
                                              for g, rs in groups.items()) + "</ul></nav>")
            body.append("<h2>Runs</h2>" + runs_table(data))
            if len(decisions):
                body.append(lr_decisions_section(decisions, data))
            for name, group_runs in groups.items():
                body.append(_group_section(name, group_runs, settings, top, detail_runs, anchors[name], figures, bar))
        finally:
            bar.close()
    from plotly.offline import get_plotlyjs

    plotly_js = f"<script>{get_plotlyjs()}</script>" if figures.count else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style><script>{_HEAD_SCRIPT}</script>{plotly_js}</head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{_CHECK_SCRIPT}</script>\n</body></html>\n"
    )


def write_report(
    store: RunStore | str | Path,
    out: str | Path,
    runs: Sequence[int | str] | None = None,
    **kwargs: Any,
) -> Path:
    """Writes `build_report` to `out`, whose directory must exist (a typo must not create
    directories); returns the path."""
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the directory {out.parent} of the report does not exist")
    page = build_report(store, runs, **kwargs)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)  # a reader never sees half a report
    return out


__all__ = ["build_report", "write_report", "figure_to_data_uri", "runs_table", "ranked_table", "health_section", "DPI"]
