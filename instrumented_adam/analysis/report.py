"""The self-contained HTML report of one or more recorded runs.

    from instrumented_adam.report import write_report
    write_report("runs/exp.sqlite", "runs/exp.html")              # every run of the store
    write_report("runs/exp.sqlite", "cmp.html", runs=["a", "b"])  # some runs, overlaid

The report is one HTML file: figures are embedded as base64 PNG, styles are inline and nothing
is fetched, so it opens offline and can be mailed or archived next to the store. Runs are
grouped for overlaying by their demo task (``hyperparameters["task"]``) — runs of other
programs form one group — so that a linear regression is not drawn on the axes of a classifier.
`docs/report.md` explains how to read each figure.

A small inline script checks, once the page has loaded, that every figure decoded
(``naturalWidth > 0``) and that no script error occurred; it records the outcome on
``<body data-report-check="ok|failed" ...>`` (tests read it from Chromium's DOM dump) and shows
a banner when something failed to load.
"""

from __future__ import annotations

import base64
import html
import io
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
from matplotlib.figure import Figure

from .. import __version__
from . import plots
from .relations import RunData, correlations, load_runs, rank_relations
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


def runs_table(runs: Sequence[RunData]) -> str:
    """The overview table: one row per run with settings, lineage and final metrics."""
    rows = []
    for i, r in enumerate(runs):
        info, hp = r.info, r.hyperparameters
        parent = info.get("parent_run")
        lineage = "–" if parent is None or pd.isna(parent) else f"run {int(parent)}, epoch {_fmt(info.get('branch_epoch'))}"
        first = r.steps.iloc[0] if len(r.steps) else {}
        lr0 = first.get("lr", hp.get("lr"))
        betas = (first.get("beta1"), first.get("beta2")) if len(r.steps) else tuple(hp.get("betas") or (None, None))
        swatch = f'<span class="swatch" style="background:{_css_color(i)}"></span>'
        rows.append([
            swatch + html.escape(r.label),
            html.escape(str(info.get("optimizer") or hp.get("optimizer") or "?")),
            _fmt(lr0),
            _fmt(_last(r, "weight_decay")),
            ", ".join(_fmt(b) for b in betas),
            str(len(r.epochs)),
            _fmt(_last(r, "step")),
            _fmt(_last(r, "train_loss")),
            _fmt(_last(r, "val_loss")),
            _fmt(_last(r, "val_accuracy")),
            lineage,
            html.escape(str(info.get("status", ""))),
        ])
    header = ["run", "optimizer", "lr (start)", "weight decay", "β1, β2", "epochs", "steps",
              "train loss", "val loss", "val acc", "branched from", "status"]
    note = '<p class="note">Losses and accuracy: the last epoch\'s.</p>'
    return '<div class="wide">' + _table(header, rows, "runs") + "</div>" + note


def _css_color(index: int) -> str:
    from matplotlib.colors import to_hex

    return to_hex(plots.run_color(index))


def ranked_table(ranked: pd.DataFrame) -> str:
    """The ranked relations as an HTML table."""
    rows = []
    for _, row in ranked.iterrows():
        rows.append([
            html.escape(row["label"]),
            html.escape(row["layer"] or "all"),
            html.escape(str(row["target"]).replace("_loss_change", " loss Δ")),
            str(int(row["lag"])),
            str(int(row["n"])),
            _fmt(row["spearman_rho"], 3),
            _fmt(row["spearman_p"], 2),
            _fmt(row["spearman_q"], 2),
            _fmt(row["pearson_r"], 3),
            _fmt(row["pearson_p"], 2),
        ])
    header = ["figure", "layer", "target", "lag", "n", "Spearman ρ", "p", "q (BH)", "Pearson r", "p"]
    return _table(header, rows, "ranked")


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
nav ul { columns: 2; font-size: 0.92em; } .wide { overflow-x: auto; }
"""

# Runs before anything else: collects script errors so that the load check can report them.
_HEAD_SCRIPT = """
window.__reportErrors = [];
window.addEventListener('error', function (e) { window.__reportErrors.push(String(e.message || e.type)); }, true);
"""

# After load: did every figure decode, and were there errors? Recorded on <body> for tests
# (Chromium --dump-dom) and shown to a reader as a banner when something went wrong.
_CHECK_SCRIPT = """
(function () {
  function check() {
    var images = Array.prototype.slice.call(document.images);
    var loaded = images.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
    var errors = window.__reportErrors || [];
    var ok = loaded === images.length && errors.length === 0;
    var body = document.body;
    body.setAttribute('data-images-total', String(images.length));
    body.setAttribute('data-images-loaded', String(loaded));
    body.setAttribute('data-js-errors', String(errors.length));
    body.setAttribute('data-report-check', ok ? 'ok' : 'failed');
    if (!ok) {
      var warning = document.getElementById('load-warning');
      warning.textContent = 'Some figures did not load (' + loaded + ' of ' + images.length + ')' +
        (errors.length ? '; script errors: ' + errors.join('; ') : '') + '.';
      warning.style.display = 'block';
    }
  }
  if (document.readyState === 'complete') { check(); } else { window.addEventListener('load', check); }
})();
"""

_CAPTIONS = {
    "losses": "Training (solid) and validation (dashed) loss at each epoch end; accuracy when logged.",
    "hyper": "Learning rate and weight decay in force at every recorded step (param group 0): what a "
             "schedule or an lr rule actually set.",
    "epoch_steps": "Left: size of each epoch's step ‖θ_end(k) − θ_end(k−1)‖. Right: angle between consecutive "
                   "epoch steps — below 90° the epochs keep heading the same way (room for a larger lr), near or "
                   "above 90° they zig-zag or turn back.",
    "distance": "How far the parameters have moved from where instrumentation began, and their norm.",
    "moments": "Epoch means of the per-step figures (line) and their range within the epoch (band). The effective "
               "lr is Adam's per-element step size lr/(bc1·(√v̂+ε)): its mean (line) and largest element (dotted).",
    "step_figures": "Relative update size ‖Δθ‖/‖θ‖ (10⁻³ is a common rule of thumb), the cosine of the update with "
                    "the gradient (negative: a descent step) and with the previous epoch's step.",
    "predicted": "Σ⟨Δθ, g⟩ over the epoch's steps is the first-order prediction of the training-loss change; "
                 "the actual change is measured between epoch ends. Points far above y = x show curvature or noise "
                 "eating the predicted decrease.",
    "trajectory": "The parameters at each epoch end over the contours of the training loss (computed exactly from "
                  "the stored data moments).",
    "parameters": "The two parameters over training; dashed: the least-squares solution (numpy.linalg.lstsq).",
    "layers": "Per-layer size of each epoch's step (log colour): which layers still move and which have settled.",
    "correlation": "Correlation of each epoch figure with the change of the training and validation loss "
                   "lag epochs later (lag 0: the same epoch). Strong values often reflect the shared trend of "
                   "training rather than a mechanism; see the q-values in the table below.",
}


def _group_section(name: str, runs: Sequence[RunData], max_lag: int, top: int, detail_runs: int, anchor: str) -> str:
    # The demo layer stores its task's description with the run; this layer never imports it.
    description = runs[0].hyperparameters.get("task_description") if runs else None
    title = f"{name}: {description}" if description else name
    parts = [f'<h2 id="{anchor}">{html.escape(title)}</h2>']
    parts.append(f'<p class="note">{len(runs)} run(s) overlaid: ' + ", ".join(
        f'<span class="swatch" style="background:{_css_color(i)}"></span>{html.escape(r.label)}' for i, r in enumerate(runs)
    ) + "</p>")
    figures: list[tuple[str, Callable[[], Figure], str]] = [
        ("losses", lambda: plots.plot_losses(runs), "loss curves"),
        ("hyper", lambda: plots.plot_hyperparameters(runs), "learning rate and weight decay"),
        ("epoch_steps", lambda: plots.plot_epoch_steps(runs), "epoch step norm and angle"),
        ("distance", lambda: plots.plot_distance(runs), "distance from init"),
        ("moments", lambda: plots.plot_moments(runs), "moment norms and effective lr"),
        ("step_figures", lambda: plots.plot_step_figures(runs), "update to parameter ratio and cosines"),
        ("predicted", lambda: plots.plot_predicted_vs_actual(runs), "predicted versus actual loss change"),
    ]
    if plots.surface_runs(runs):
        figures[1:1] = [
            ("trajectory", lambda: plots.plot_trajectory(runs), "trajectory on the loss surface"),
            ("parameters", lambda: plots.plot_parameters(runs), "parameters over training"),
        ]
    for key, make, alt in figures:
        parts.append(_figure_html(make(), _CAPTIONS[key], alt))
    for r in runs[:detail_runs]:
        parts.append(f"<h3>{html.escape(r.label)}</h3>")
        if len(r.layers):
            parts.append(_figure_html(plots.plot_layer_heatmap(r), _CAPTIONS["layers"], f"per-layer step norms of {r.label}"))
        corr = correlations(r.epochs, max_lag=max_lag, layers=r.layers)
        if corr.empty:
            parts.append('<p class="note">Too few epochs with a logged loss to correlate (at least 5 pairs are needed).</p>')
            continue
        parts.append(_figure_html(
            plots.plot_correlation_heatmap(corr, f"{plots.plain(r.label)}: figures vs loss change"), _CAPTIONS["correlation"],
            f"correlation heatmap of {r.label}",
        ))
        parts.append(f"<p><b>Strongest relations</b> (top {top} of {len(corr)} figure × target × lag tests, overall and "
                     "per layer, ranked by |Spearman ρ|):</p>")
        parts.append(ranked_table(rank_relations(corr, top=top)))
    if len(runs) > detail_runs:
        parts.append(f'<p class="note">Per-run details shown for the first {detail_runs} of {len(runs)} runs '
                     "(report fewer runs, or raise detail_runs, to see the others).</p>")
    return "\n".join(parts)


def build_report(
    store: RunStore | str | Path,
    runs: Sequence[int | str] | None = None,
    *,
    title: str | None = None,
    max_lag: int = 3,
    top: int = 15,
    detail_runs: int = 8,
) -> str:
    """The report's HTML for `runs` of `store` (all runs when None or empty).

    Args:
        store: a `RunStore` or the path of one.
        runs: run ids or names.
        title: the page title (default: the store's file name).
        max_lag: the largest lag (epochs) of the loss correlations.
        top: rows of each run's ranked relation table.
        detail_runs: runs per group that get a per-layer heatmap and correlations.
    """
    owned = not isinstance(store, RunStore)
    store_obj = RunStore(store) if owned else store
    try:
        data = load_runs(store_obj, runs)
        path = store_obj.path
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
    if not data:
        body.append("<p>The store holds no runs yet.</p>")
    else:
        anchors = {name: f"group-{i}" for i, name in enumerate(groups)}
        body.append("<nav><ul>" + "".join(f'<li><a href="#{anchors[g]}">{html.escape(g)}</a> ({len(rs)} runs)</li>'
                                          for g, rs in groups.items()) + "</ul></nav>")
        body.append("<h2>Runs</h2>" + runs_table(data))
        for name, group_runs in groups.items():
            body.append(_group_section(name, group_runs, max_lag, top, detail_runs, anchors[name]))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style><script>{_HEAD_SCRIPT}</script></head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{_CHECK_SCRIPT}</script>\n</body></html>\n"
    )


def write_report(
    store: RunStore | str | Path,
    out: str | Path,
    runs: Sequence[int | str] | None = None,
    **kwargs: Any,
) -> Path:
    """Writes `build_report` to `out` (parent directories created); returns the path."""
    page = build_report(store, runs, **kwargs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)  # a reader never sees half a report
    return out


__all__ = ["build_report", "write_report", "figure_to_data_uri", "runs_table", "ranked_table", "DPI"]
