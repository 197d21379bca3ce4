"""Branches of a store: the provenance tree, per-branch-point overlays and the comparison of each
branch's final and best validation loss with its parent's own continuation (DataFrames), and the
HTML report of a study (tree, overlays, table) built from them.

Reads the store only (no torch): ``branch_tree``, ``branch_overlays``, ``branch_comparison``,
``write_branch_report``. A branch's overrides and seed come from the run's hyperparameters
(``study_branch``, written by `instrumented_adam.studies`); a branch made with
`Recorder.branch` directly shows the hyperparameters that differ from its parent's.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..telemetry.store import RunStore
from . import interactive as _interactive
from . import report as _report

#: What the overlays show per branch point: (epoch column, panel title).
OVERLAY_FIGURES: tuple[tuple[str, str], ...] = (
    ("train_loss", "training loss"), ("val_loss", "validation loss"), ("step_norm", "epoch step norm ‖s_k‖"),
    ("cos_prev", "cos ∠(s_k, s_k−1)"), ("lr", "learning rate"), ("exp_avg_norm_mean", "‖m‖ (epoch mean)"),
    ("second_moment_mean_mean", "mean v (epoch mean)"),
)

_TREE_COLUMNS = ["run_id", "name", "parent_run", "branch_epoch", "depth", "status", "seed", "overrides", "label",
                 "branch_id", "error", "first_epoch", "last_epoch"]


def _open(store: RunStore | str | Path) -> tuple[RunStore, bool]:
    return (store, False) if isinstance(store, RunStore) else (RunStore(store, readonly=True), True)


def _overrides(info: pd.Series, runs: pd.DataFrame) -> dict[str, Any]:
    hyper = info["hyperparameters"] or {}
    branch = hyper.get("study_branch") if isinstance(hyper, dict) else None
    if isinstance(branch, dict):
        return dict(branch.get("overrides") or {})
    if pd.isna(info["parent_run"]):
        return {}
    parent = runs.loc[int(info["parent_run"]), "hyperparameters"] or {}
    return {k: v for k, v in hyper.items() if isinstance(v, (int, float, str, bool)) and parent.get(k) != v}


def _label(overrides: dict[str, Any], seed: Any, at: Any) -> str:
    parts = [f"@{int(at)}"] if not pd.isna(at) else []
    parts += [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in sorted(overrides.items())] or ["no overrides"]
    if seed is not None and not pd.isna(seed):
        parts.append(f"seed {int(seed)}")
    return " ".join(parts)


def branch_tree(store: RunStore | str | Path) -> pd.DataFrame:
    """One row per run, in tree order (each parent before its children): run_id, name,
    parent_run, branch_epoch, depth, status, seed, overrides (dict), label, branch_id, error,
    first_epoch, last_epoch; plus a row (run_id <NA>) for each study branch that failed
    before it had a run, with its error."""
    store, owned = _open(store)
    try:
        runs = store.runs().set_index("run_id", drop=False)
        epochs = store.epochs(with_metrics=False)
        branches = store.study_branches()
    finally:
        if owned:
            store.close()
    span = epochs.groupby("run_id")["epoch"].agg(["min", "max"]) if len(epochs) else pd.DataFrame(columns=["min", "max"])
    by_run = {int(r): b for r, b in zip(branches["run_id"], branches["branch_id"]) if not pd.isna(r)}
    children: dict[int | None, list[int]] = {}
    for rid, parent in zip(runs["run_id"], runs["parent_run"]):
        children.setdefault(None if pd.isna(parent) else int(parent), []).append(int(rid))
    rows: list[dict[str, Any]] = []

    def visit(rid: int, depth: int) -> None:
        info = runs.loc[rid]
        hyper = info["hyperparameters"] or {}
        study_branch = hyper.get("study_branch") if isinstance(hyper, dict) else None
        seed = (study_branch or {}).get("seed") if study_branch else None
        overrides = _overrides(info, runs)
        rows.append({
            "run_id": rid, "name": info["name"], "parent_run": info["parent_run"], "branch_epoch": info["branch_epoch"],
            "depth": depth, "status": info["status"], "seed": info["seed"], "overrides": overrides,
            "label": _label(overrides, seed, info["branch_epoch"]) if depth else info["name"],
            "branch_id": by_run.get(rid), "error": info["status_detail"] if info["status"] == "failed" else None,
            "first_epoch": span["min"].get(rid, np.nan), "last_epoch": span["max"].get(rid, np.nan),
        })
        for child in sorted(children.get(rid, [])):
            visit(child, depth + 1)

    known = set(int(r) for r in runs["run_id"])
    for root in sorted(children.get(None, [])):
        visit(root, 0)
    for rid in sorted(known - {r["run_id"] for r in rows}):  # a parent outside the store: shown as a root
        visit(rid, 0)
    failed = branches[branches["run_id"].isna()]
    for _, b in failed.iterrows():
        spec = b["spec"]
        rows.append({
            "run_id": pd.NA, "name": "", "parent_run": b["parent_run"], "branch_epoch": b["branch_epoch"], "depth": 1,
            "status": b["status"], "seed": b["seed"], "overrides": dict(spec.get("overrides") or {}),
            "label": _label(dict(spec.get("overrides") or {}), spec.get("seed"), b["branch_epoch"]),
            "branch_id": b["branch_id"], "error": b["error"], "first_epoch": np.nan, "last_epoch": np.nan,
        })
    out = pd.DataFrame(rows, columns=_TREE_COLUMNS)
    for col in ("run_id", "parent_run", "branch_epoch", "seed"):
        out[col] = out[col].astype("Int64")
    return out


def format_tree(tree: pd.DataFrame) -> str:
    """The tree as indented text lines (what ``instrumented-adam runs STORE --tree`` prints)."""
    lines = []
    for _, r in tree.iterrows():
        rid = "-" if pd.isna(r["run_id"]) else str(int(r["run_id"]))
        indent = "    " * int(r["depth"])
        what = r["name"] if int(r["depth"]) == 0 else r["label"]
        line = f"{indent}{'└─ ' if r['depth'] else ''}[{rid}] {what}  ({r['status']})"
        if r["depth"] and pd.isna(r["run_id"]) and r["branch_id"]:
            line += f"  branch {r['branch_id']}"
        if isinstance(r["error"], str) and r["error"]:
            line += "  error: " + r["error"].strip().splitlines()[-1][:160]
        lines.append(line)
    return "\n".join(lines)


def branch_overlays(store: RunStore | str | Path, parent: int | str, at_epoch: int,
                    figures: Sequence[str] = tuple(f for f, _ in OVERLAY_FIGURES)) -> pd.DataFrame:
    """Long-form overlays of the branches of `parent` from `at_epoch`: run_id, role ('parent'
    for its own continuation, 'branch'), label, overrides (the label without the seed: one per
    override set), epoch, figure, value — from epoch at_epoch − 1
    (the common start) on. Figures a run lacks are left out."""
    store, owned = _open(store)
    try:
        parent_id = store.run_id(parent)
        tree = branch_tree(store)
        kids = tree[(tree["parent_run"] == parent_id) & (tree["branch_epoch"] == int(at_epoch)) & tree["run_id"].notna()]
        ids = [parent_id, *[int(r) for r in kids["run_id"]]]
        epochs = store.epochs()
    finally:
        if owned:
            store.close()
    labels = {parent_id: "parent (own continuation)", **{int(r): l for r, l in zip(kids["run_id"], kids["label"])}}
    groups = {parent_id: "parent (own continuation)",
              **{int(r): _label(o, None, at_epoch) for r, o in zip(kids["run_id"], kids["overrides"])}}
    frames = []
    for rid in ids:
        e = epochs[(epochs["run_id"] == rid) & (epochs["epoch"] >= int(at_epoch) - 1)]
        if rid != parent_id:
            start = epochs[(epochs["run_id"] == parent_id) & (epochs["epoch"] == int(at_epoch) - 1)]
            e = pd.concat([start.assign(run_id=rid), e])  # every branch starts from the parent's state
        cols = [f for f in figures if f in e.columns]
        long = e.melt(id_vars=["run_id", "epoch"], value_vars=cols, var_name="figure", value_name="value")
        long.insert(1, "role", "parent" if rid == parent_id else "branch")
        long.insert(2, "label", labels[rid])
        long.insert(3, "overrides", groups[rid])
        frames.append(long)
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["run_id", "role", "label", "overrides", "epoch", "figure", "value"])
    return out.sort_values(["figure", "run_id", "epoch"], kind="stable").reset_index(drop=True)


def _t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a Student-t interval of the mean (NaN bounds with fewer than 2 values)."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def branch_comparison(store: RunStore | str | Path, metric: str = "val_loss", level: float = 0.95) -> pd.DataFrame:
    """Per (parent, branch epoch, overrides): the branches' final and best `metric` over their
    epochs and the difference to the parent's own continuation over the same epochs (final:
    at the branch's last epoch; best: the minimum over the branch's epochs), as the mean over
    seeds with a Student-t confidence interval (`level`; NaN with one seed or when the parent
    did not train that far). Columns: parent_run, branch_epoch, overrides (label), seeds,
    run_ids, last_epoch, final, best, parent_final, parent_best, diff_final, diff_final_low,
    diff_final_high, diff_best, diff_best_low, diff_best_high."""
    store, owned = _open(store)
    try:
        tree = branch_tree(store)
        epochs = store.epochs()
    finally:
        if owned:
            store.close()
    branches = tree[(tree["depth"] > 0) & tree["run_id"].notna() & tree["status"].isin(["finished", "diverged"])].copy()
    columns = ["parent_run", "branch_epoch", "overrides", "seeds", "run_ids", "last_epoch", "final", "best", "parent_final",
               "parent_best", "diff_final", "diff_final_low", "diff_final_high", "diff_best", "diff_best_low", "diff_best_high"]
    if branches.empty or metric not in epochs.columns:
        return pd.DataFrame(columns=columns)
    branches["key"] = branches["overrides"].map(lambda o: json.dumps(o, sort_keys=True))
    series = {int(r): g.set_index("epoch")[metric] for r, g in epochs.groupby("run_id")}
    rows = []
    for (parent, at, key), group in branches.groupby(["parent_run", "branch_epoch", "key"], sort=True):
        p = series.get(int(parent), pd.Series(dtype=float))
        finals, bests, d_final, d_best, last = [], [], [], [], []
        for rid in group["run_id"]:
            s = series.get(int(rid), pd.Series(dtype=float))
            if s.empty:
                continue
            end = int(s.index.max())
            finals.append(float(s.loc[end]))
            bests.append(float(s.min()))
            last.append(end)
            same = p[(p.index >= s.index.min()) & (p.index <= end)]
            has_all = len(same) == len(s)
            d_final.append(float(s.loc[end] - p.loc[end]) if end in p.index else math.nan)
            d_best.append(float(s.min() - same.min()) if has_all else math.nan)
        if not finals:
            continue
        end = max(last)
        span = p[(p.index >= int(at)) & (p.index <= end)]
        f_mean, f_low, f_high = _t_interval(np.array(d_final), level)
        b_mean, b_low, b_high = _t_interval(np.array(d_best), level)
        rows.append({
            "parent_run": int(parent), "branch_epoch": int(at), "overrides": _label(json.loads(key), None, math.nan),
            "seeds": len(finals), "run_ids": [int(r) for r in group["run_id"]], "last_epoch": end,
            "final": float(np.mean(finals)), "best": float(np.mean(bests)),
            "parent_final": float(p.loc[end]) if end in p.index else math.nan,
            "parent_best": float(span.min()) if len(span) == end - int(at) + 1 else math.nan,
            "diff_final": f_mean, "diff_final_low": f_low, "diff_final_high": f_high,
            "diff_best": b_mean, "diff_best_low": b_low, "diff_best_high": b_high,
        })
    return pd.DataFrame(rows, columns=columns)


# ---- the report -------------------------------------------------------------------------------
def _finite(values: Any) -> list:
    return [None if (v is None or (isinstance(v, float) and not math.isfinite(v))) else float(v) for v in values]


def figure_tree(tree: pd.DataFrame) -> dict:
    """The provenance tree: each run a horizontal line over its epochs on its own row, joined to
    its parent's row at the branch epoch; colour by status."""
    colours = {"finished": "#1f77b4", "running": "#ff7f0e", "failed": "#d62728", "diverged": "#9467bd", "pending": "#7f7f7f"}
    shown = tree[tree["run_id"].notna()].reset_index(drop=True)
    row_of = {int(r): i for i, r in enumerate(shown["run_id"])}
    data = []
    for i, r in shown.iterrows():
        first = r["first_epoch"] if not pd.isna(r["first_epoch"]) else (r["branch_epoch"] if not pd.isna(r["branch_epoch"]) else 0)
        last = r["last_epoch"] if not pd.isna(r["last_epoch"]) else first
        colour = colours.get(r["status"], "#333")
        data.append({"type": "scatter", "mode": "lines+markers", "x": _finite([first, last]), "y": [i, i],
                     "line": {"color": colour, "width": 4}, "marker": {"size": 6}, "showlegend": False,
                     "name": f"[{int(r['run_id'])}] {r['label']}", "hovertemplate": f"[{int(r['run_id'])}] "
                     f"{html.escape(str(r['label']))} ({r['status']})<br>epochs %{{x}}<extra></extra>"})
        if not pd.isna(r["parent_run"]) and int(r["parent_run"]) in row_of:
            at = float(r["branch_epoch"]) - 1 if not pd.isna(r["branch_epoch"]) else first
            data.append({"type": "scatter", "mode": "lines", "x": [at, at, float(first)],
                         "y": [row_of[int(r["parent_run"])], i, i], "line": {"color": "#999", "width": 1, "dash": "dot"},
                         "showlegend": False, "hoverinfo": "skip"})
    for status, colour in colours.items():
        if status in set(shown["status"]):
            data.append({"type": "scatter", "mode": "lines", "x": [None], "y": [None], "name": status,
                         "line": {"color": colour, "width": 4}})
    labels = [f"[{int(r)}] {l}" for r, l in zip(shown["run_id"], shown["label"])]
    layout = _interactive._layout("Provenance: runs and the branches taken from them", height=max(260, 40 + 26 * len(shown)))
    layout.update(xaxis={"title": {"text": "epoch"}},
                  yaxis={"tickvals": list(range(len(shown))), "ticktext": labels, "autorange": "reversed",
                         "automargin": True})
    return {"data": data, "layout": layout}


def figure_overlays(overlays: pd.DataFrame, title: str) -> dict:
    """Panels of `OVERLAY_FIGURES` with each branch against the parent's continuation (black)."""
    titles = [t for f, t in OVERLAY_FIGURES if f in set(overlays["figure"])]
    names = [f for f, _ in OVERLAY_FIGURES if f in set(overlays["figure"])]
    rows = -(-len(names) // 3)
    layout = _interactive._layout("", height=260 * rows + 90, margin={"l": 60, "r": 20, "t": 40, "b": 40})
    del title  # the page's heading names the branch point
    layout.update(_interactive._grid(3, titles, rows=rows))
    data = []
    # One colour and one legend entry per override set: its seeds are lines of the same colour.
    sets = list(dict.fromkeys(overlays.loc[overlays["role"] == "branch", "overrides"]))
    for k, figure in enumerate(names):
        axis = "" if k == 0 else str(k + 1)
        part = overlays[overlays["figure"] == figure]
        shown: set[str] = set()
        for (rid, label, group, role), g in part.groupby(["run_id", "label", "overrides", "role"], sort=False):
            colour = "#000" if role == "parent" else _interactive.run_color(sets.index(group))
            first = k == 0 and group not in shown
            shown.add(group)
            data.append({"type": "scatter", "mode": "lines+markers", "x": [int(e) for e in g["epoch"]],
                         "y": _finite(g["value"]), "name": group, "legendgroup": group, "showlegend": first,
                         "hovertemplate": f"{html.escape(str(label))}<br>epoch %{{x}}: %{{y:.4g}}<extra></extra>",
                         "xaxis": f"x{axis}", "yaxis": f"y{axis}", "marker": {"size": 4},
                         "line": {"color": colour, "width": 2.5 if role == "parent" else 1.5,
                                  "dash": "solid"}})
    return {"data": data, "layout": layout}


def build_branch_report(store: RunStore | str | Path, metric: str = "val_loss", title: str | None = None) -> str:
    """The study report as one self-contained HTML page (see the module docstring)."""
    store, owned = _open(store)
    try:
        tree = branch_tree(store)
        comparison = branch_comparison(store, metric)
        points = tree[(tree["depth"] > 0) & tree["run_id"].notna()][["parent_run", "branch_epoch"]].drop_duplicates()
        overlays = [(int(p), int(e), branch_overlays(store, int(p), int(e))) for p, e in points.itertuples(index=False)]
        names = store.runs().set_index("run_id")["name"]
        path = store.path
    finally:
        if owned:
            store.close()
    figures = _report._Figures()
    title = title or f"Branching study: {path.name}"
    body = [f"<h1>{html.escape(title)}</h1><div id=\"load-warning\"></div>",
            f"<p class=\"meta\">{len(tree[tree['depth'] == 0])} root run(s), {int((tree['depth'] > 0).sum())} branch(es): "
            f"{', '.join(f'{n} {s}' for s, n in tree[tree['depth'] > 0]['status'].value_counts().items())}</p>",
            "<h2>Provenance tree</h2>",
            figures.div(figure_tree(tree), "Each row a run over its epochs; a dotted line joins a branch to its parent at the "
                        "epoch it starts from.", "provenance tree"),
            "<div class=\"wide\"><pre>" + html.escape(format_tree(tree)) + "</pre></div>"]
    body.append(f"<h2>Branches against their parent ({html.escape(metric)})</h2>")
    header = ["parent", "from epoch", "overrides", "seeds", "last epoch", "final", "best", "parent final", "parent best",
              "Δ final (95% CI)", "Δ best (95% CI)"]

    def ci(mean: float, low: float, high: float) -> str:
        if not math.isfinite(mean):
            return "–"
        return f"{mean:+.4g}" + (f" [{low:+.3g}, {high:+.3g}]" if math.isfinite(low) else " (one seed)")

    table_rows = [[f"[{r.parent_run}] {names.get(r.parent_run, '')}", r.branch_epoch, r.overrides, r.seeds, r.last_epoch,
                   _report._fmt(r.final), _report._fmt(r.best), _report._fmt(r.parent_final), _report._fmt(r.parent_best),
                   ci(r.diff_final, r.diff_final_low, r.diff_final_high), ci(r.diff_best, r.diff_best_low, r.diff_best_high)]
                  for r in comparison.itertuples(index=False)]
    body.append("<div class=\"wide\">" + _report._table(header, table_rows) + "</div>" if table_rows
                else "<p class=\"note\">No finished branches yet.</p>")
    body.append("<p class=\"note\">Δ: branch minus the parent's own continuation over the same epochs (negative: the branch "
                "is lower), mean over seeds with a Student-t 95% interval.</p>")
    for parent, at, frame in overlays:
        body.append(f"<h2>From epoch {at} of [{parent}] {html.escape(str(names.get(parent, '')))}</h2>")
        body.append(figures.div(figure_overlays(frame, f"Branches from epoch {at}"),
                                "Black: the parent's own continuation; colours: the branches (every seed), from the "
                                "common state at the branch point on.", f"overlays from epoch {at}"))
    from plotly.offline import get_plotlyjs

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(title)}</title>"
            f"<style>{_report._CSS}</style><script>{_report._HEAD_SCRIPT}</script><script>{get_plotlyjs()}</script></head>\n"
            "<body>\n" + "\n".join(body) + f"\n<script>{_report._CHECK_SCRIPT}</script>\n</body></html>\n")


def write_branch_report(store: RunStore | str | Path, out: str | Path, **kwargs: Any) -> Path:
    """Writes `build_branch_report` to `out` (its directory must exist); returns the path."""
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the directory {out.parent} of the report does not exist")
    page = build_branch_report(store, **kwargs)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


__all__ = ["branch_tree", "format_tree", "branch_overlays", "branch_comparison", "figure_tree", "figure_overlays",
           "build_branch_report", "write_branch_report", "OVERLAY_FIGURES"]
