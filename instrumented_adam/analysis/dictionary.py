"""The data dictionary of a run store: what every table and column means.

`docs/data-dictionary.md` is written by this module from a store (so it lists the columns a store
really has) and from `core.figures` (so the figure rows cannot drift from their formulas):

    python -m instrumented_adam.analysis.dictionary runs/demo/demo.sqlite docs/data-dictionary.md

tests/test_report.py regenerates it from a fresh demo store and checks that the committed file
matches and that every column of every table is described.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Mapping, Sequence

from ..telemetry.store import KNOWN_HYPERPARAMETERS
from ..core.figures import (AGGREGATE_KINDS, EPOCH_FIGURE_FORMULAS, KIND_FORMULAS, STEP_FIGURE_FORMULAS, Figure,
                            aggregate_names)

#: What each table holds.
TABLES: dict[str, str] = {
    "meta": "Key/value facts about the file: format marker, creation time, package version.",
    "runs": "One row per run (a training, a resumed training or a branch), with its lineage.",
    "steps": "Overall figures per recorded step (every step, or every `step_every`-th); hyperparameters of "
             "param group 0.",
    "step_groups": "The same per param group, written only when the optimizer has more than one group.",
    "epochs": "One row per epoch end: epoch geometry, epoch aggregates of the step figures, and the user's metrics "
              "(`RunStore.epochs` joins the metrics table in as columns).",
    "layer_epochs": "One row per tensor per epoch: the epoch geometry per tensor and the figures of the epoch's "
                    "last step for that tensor.",
    "metrics": "User metrics (train/val loss, accuracy, ...) in long form, as logged.",
    "checkpoints": "Checkpoints the recorder saved, with the position they hold.",
    "leases": "Which process currently writes a run (one writer per run; a stale lease can be taken over).",
    "gaps": "Step/epoch ranges known to be missing from a run (e.g. lost to a crash before a flush).",
    "lr_decisions": "Decisions of learning-rate rules (core.lr_rules, written by `Recorder.add_lr_rule`): what "
                    "each rule saw and what it did to the lr. Per-step rules write one summary per epoch.",
    "histograms": "The kernel's per-tensor log2 histograms of a step (optimizer option `histogram_every`): one row "
                  "per step, tensor and kind, counted in the update's pass over memory. Bins: 0 is exactly 0; 1 is "
                  "0 < |x| < 2^-126; b = 2..255 is 2^(b-128) <= |x| < 2^(b-127); 256 is |x| >= 2^128 (finite, fp64 "
                  "only); 257 is NaN or ±inf (`instrumented_adam.core.histogram`).",
}

#: Columns that are not figures, by table ("*" for every table that has the column).
COLUMNS: dict[tuple[str, str], str] = {
    ("*", "run_id"): "The run the row belongs to (runs.run_id).",
    ("meta", "key"): "The fact's name.",
    ("meta", "value"): "The fact's value (text).",
    ("runs", "name"): "The run's name (need not be unique; the report shows `<run_id>:<name>`).",
    ("runs", "started_at"): "UTC time the run was created (ISO 8601).",
    ("runs", "updated_at"): "UTC time of the run's last write.",
    ("runs", "finished_at"): "UTC time the run was closed (empty while running).",
    ("runs", "status"): "running, finished, failed, or diverged (non-finite values; where in status_detail).",
    ("runs", "status_detail"): "Why a run failed or diverged, and where (step, epoch, layers).",
    ("runs", "seed"): "The seed the caller gave, if any.",
    ("runs", "code_version"): "git describe of the training code (with -dirty for local changes), when known.",
    ("runs", "package_version"): "instrumented_adam's version that wrote the run.",
    ("runs", "optimizer"): "The optimizer's class name (Adam, AdamW, Adamax, ...).",
    ("runs", "hyperparameters"): "JSON: what the caller recorded about the run (the demo: its task, "
                                 "task_description, and the training configuration).",
    ("runs", "optimizer_config"): "JSON: each param group's options as torch.optim holds them (initial_lr included "
                                  "when a scheduler set it).",
    ("runs", "parent_run"): "For a resumed run or a branch: the run it continues.",
    ("runs", "branch_epoch"): "Epochs done at the branch point (the parent's position).",
    ("runs", "branch_step"): "Optimizer steps done at the branch point.",
    ("runs", "num_groups"): "Number of param groups.",
    ("runs", "hyperparameter_columns"): "JSON: the hyperparameter columns this run's step and epoch rows carry.",
    ("*", "step"): "The optimizer step (1-based, counted over the whole lineage: a branch continues its parent's "
                   "count). In epochs: the last step of the epoch; in checkpoints: the step saved.",
    ("*", "epoch"): "The epoch (0-based) the row belongs to.",
    ("*", "grp"): "The param group index.",
    ("*", "lr"): "Learning rate in force (param group 0 in steps and epochs).",
    ("*", "weight_decay"): "Weight decay in force.",
    ("*", "beta1"): "β₁ (first-moment decay) in force.",
    ("*", "beta2"): "β₂ (second-moment decay) in force.",
    ("*", "eps"): "ε in force.",
    # Every numeric setting of a param group is a column (telemetry.capture.flatten_hyperparameters);
    # booleans are stored as 0/1.
    ("*", "amsgrad"): "AMSGrad variant on (1) or off (0).",
    ("*", "momentum"): "Momentum μ in force (SGD, RMSprop).",
    ("*", "dampening"): "SGD's dampening τ of the gradient in the momentum buffer.",
    ("*", "nesterov"): "1 when SGD uses Nesterov momentum.",
    ("*", "alpha"): "RMSprop's smoothing constant α of the squared-gradient average.",
    ("*", "centered"): "1 when RMSprop divides by the centered second moment v − ḡ².",
    ("*", "lr_decay"): "Adagrad's learning-rate decay: clr = lr / (1 + (t − 1)·lr_decay).",
    ("*", "initial_accumulator_value"): "Adagrad's starting value of the squared-gradient sum.",
    ("*", "maximize"): "1 when the optimizer maximizes the objective.",
    ("*", "decoupled_weight_decay"): "1 when weight decay is decoupled (AdamW), 0 when added to the gradient (Adam).",
    ("*", "skipped"): "1 when a GradScaler skipped the step (inf/NaN gradients), else 0.",
    ("*", "grad_scale"): "The GradScaler's scale at the step (empty without AMP).",
    ("epochs", "num_steps"): "Optimizer steps in the epoch.",
    ("epochs", "recorded_steps"): "Of them, steps with a row in `steps` (all, or every `step_every`-th).",
    ("epochs", "skipped_steps"): "Steps of the epoch skipped by a GradScaler.",
    ("epochs", "wall_time"): "Seconds since the run started, at the epoch end.",
    ("layer_epochs", "layer_index"): "Position of the tensor in the optimizer's parameter order.",
    ("layer_epochs", "layer"): "The tensor's name (from the model when given, else group.index).",
    ("layer_epochs", "numel"): "Elements in the tensor (the per-element RMS of a norm is norm/√numel).",
    ("metrics", "name"): "The metric's name (train_loss, val_loss, ...: a column of the same name in epochs).",
    ("metrics", "value"): "The metric's value (NaN is stored as NULL).",
    ("metrics", "seq"): "Write order, so that a metric logged twice at a position keeps its last value.",
    ("checkpoints", "epochs_done"): "Epochs completed in the checkpoint.",
    ("checkpoints", "path"): "Where the checkpoint file was written.",
    ("checkpoints", "saved_at"): "UTC time it was saved.",
    ("lr_decisions", "seq"): "Order of the run's decisions.",
    ("lr_decisions", "grp"): "The param group the decision was for, -1 for all groups at once.",
    ("lr_decisions", "rule"): "The rule (aligned, careful, extrapolation, hypergradient, eve).",
    ("lr_decisions", "action"): "What it did: up, down, hold, cut, rollback, grow, jump (moved θ along s_k), stay.",
    ("lr_decisions", "lr_before"): "The lr before the decision (param group `grp`, or group 0 when grp is -1).",
    ("lr_decisions", "lr_after"): "The lr after it.",
    ("lr_decisions", "figure"): "The figure that triggered it (cos_prev, loss, probe_loss, cos_grad_prev_exp_avg, "
                                "eve_d).",
    ("lr_decisions", "value"): "Its value (per-step rules: the mean over the epoch's steps).",
    ("lr_decisions", "detail"): "JSON: more of what the rule saw (CarefulLR's reference loss; EpochExtrapolation's "
                                "probe curve: alphas, losses and the α taken).",
    ("leases", "writer"): "An id of the writing process.",
    ("leases", "host"): "Its host name.",
    ("leases", "pid"): "Its process id.",
    ("leases", "pid_namespace"): "Its PID namespace (containers), to tell a live holder from a reused pid.",
    ("leases", "acquired_at"): "UTC time the lease was taken.",
    ("leases", "heartbeat"): "The holder's last sign of life.",
    ("leases", "expire_after"): "Seconds after the heartbeat after which the lease may be taken over.",
    ("histograms", "layer_index"): "Position of the tensor in the optimizer's parameter order.",
    ("histograms", "layer"): "The tensor's name (from the model when given, else param.index).",
    ("histograms", "kind"): "grad_abs: |g| (after AMP unscaling, before maximize and weight decay); update_abs: |Δθ| "
                            "as applied; eff_lr: the per-element effective step size lr/(bc1·(√(v/bc2)+ε)) "
                            "(Adamax: lr/(bc1·u)).",
    ("histograms", "first_bin"): "The bin of the first stored count (bins below it are empty).",
    ("histograms", "counts"): "JSON list: element counts of bins first_bin, first_bin+1, ... up to the last non-empty "
                              "bin (`RunStore.histograms` returns all 258 as an array).",
    ("gaps", "gap_id"): "The gap's id.",
    ("gaps", "from_step"): "First missing step.",
    ("gaps", "to_step"): "Last missing step.",
    ("gaps", "from_epoch"): "First missing epoch.",
    ("gaps", "to_epoch"): "Last missing epoch.",
    ("gaps", "reason"): "Why the rows are missing.",
    ("gaps", "marked_at"): "UTC time the gap was recorded.",
}

#: Metric columns the demo logs (any other metric a user logs appears under its own name).
METRICS: dict[str, str] = {
    "train_loss": "Training loss at the epoch end (the demo: mean over the training set).",
    "val_loss": "Validation loss at the epoch end.",
    "train_accuracy": "Training accuracy at the epoch end (classification tasks).",
    "val_accuracy": "Validation accuracy at the epoch end.",
    "slope": "The linear-regression demo's slope parameter at the epoch end.",
    "intercept": "The linear-regression demo's intercept parameter at the epoch end.",
}


def _figure_row(f: Figure, where: str) -> str:
    return f"| `{f.name}` | {where} | {f.label} | {f.formula} |"


def figure_section() -> str:
    """The figure rows, from `core.figures`."""
    lines = [
        "## Figures (from `instrumented_adam.core.figures`)",
        "",
        "Every figure is a formula over the sums the kernel accumulates in the same pass as the update "
        "(`csrc/stats_table.h`). Kinds: " + "; ".join(f"{k}: {v}" for k, v in KIND_FORMULAS.items()) + ".",
        "",
        "| column | tables | meaning | formula |",
        "| --- | --- | --- | --- |",
    ]
    lines += [_figure_row(f, "steps, step_groups, layer_epochs") for f in STEP_FIGURE_FORMULAS]
    lines += [_figure_row(f, "epochs, layer_epochs") for f in EPOCH_FIGURE_FORMULAS]
    lines += [
        "",
        "Epoch aggregates: for every step figure `f`, the epochs table has "
        + ", ".join(f"`f_{a}`" for a in AGGREGATE_KINDS)
        + " over the epoch's recorded steps (e.g. `" + "`, `".join(aggregate_names(["grad_norm"])) + "`).",
    ]
    return "\n".join(lines)


def _describe(table: str, column: str) -> str | None:
    figures = {f.name: f for f in (*STEP_FIGURE_FORMULAS, *EPOCH_FIGURE_FORMULAS)}
    if (table, column) in COLUMNS:
        return COLUMNS[(table, column)]
    if ("*", column) in COLUMNS:
        return COLUMNS[("*", column)]
    if column in figures:
        return f"Figure: {figures[column].label} (see Figures)."
    for agg in AGGREGATE_KINDS:
        base = column[: -len(agg) - 1]
        if column.endswith("_" + agg) and base in figures:
            return f"The epoch {agg} of `{base}` over the recorded steps."
    if table == "epochs" and column in METRICS:
        return METRICS[column]
    if column in KNOWN_HYPERPARAMETERS or column == "initial_lr":
        # Not Adam's alone: each run carries the options its optimizer has (runs.hyperparameter_columns).
        return f"Hyperparameter `{column}` in force: torch.optim's param-group option of that name (numeric; booleans 0/1)."
    return None


def store_columns(path: str | Path) -> dict[str, list[str]]:
    """Table → columns of a store file, in the file's order (read with sqlite3 only)."""
    with sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY rowid")]
        return {t: [r[1] for r in conn.execute(f'PRAGMA table_info("{t}")')] for t in tables}


def undocumented(columns: Mapping[str, Sequence[str]]) -> list[str]:
    """`table.column` for every column the dictionary cannot describe."""
    return [f"{t}.{c}" for t, cols in columns.items() for c in cols if _describe(t, c) is None]


def render(columns: Mapping[str, Sequence[str]], metric_columns: Sequence[str] = tuple(METRICS)) -> str:
    """The data dictionary as Markdown: the tables and their columns, then the figures."""
    lines = [
        "# Data dictionary of a run store",
        "",
        "Generated by `python -m instrumented_adam.analysis.dictionary STORE docs/data-dictionary.md` from a demo "
        "store and `instrumented_adam.core.figures`; do not edit by hand (tests/test_report.py checks it). "
        "NaN is stored as NULL and read back as NaN. A statistic added to the kernel's table appears as a column "
        "of the same name (a `value` figure) with no schema change.",
        "",
    ]
    for table, cols in columns.items():
        lines += [f"## `{table}`", "", TABLES.get(table, ""), "", "| column | meaning |", "| --- | --- |"]
        for c in cols:
            lines.append(f"| `{c}` | {_describe(table, c) or '(undocumented)'} |")
        if table in ("steps", "step_groups", "epochs"):
            # Hyperparameter columns follow the optimizer: list every one a run may carry.
            for name in (*KNOWN_HYPERPARAMETERS, "initial_lr"):
                if name not in cols:
                    lines.append(f"| `{name}` | {_describe(table, name)} (when the run's optimizer has it) |")
        if table == "epochs":
            for m in metric_columns:
                lines.append(f"| `{m}` | {METRICS[m]} (from `metrics`) |")
        lines.append("")
    lines.append(figure_section())
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m instrumented_adam.analysis.dictionary STORE OUT.md``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m instrumented_adam.analysis.dictionary STORE OUT.md", file=sys.stderr)
        return 2
    columns = store_columns(args[0])
    missing = undocumented(columns)
    if missing:
        print(f"undocumented columns: {', '.join(missing)}", file=sys.stderr)
        return 1
    Path(args[1]).write_text(render(columns), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["TABLES", "COLUMNS", "METRICS", "figure_section", "store_columns", "undocumented", "render", "main"]
