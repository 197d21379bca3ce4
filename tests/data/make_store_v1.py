"""Builds store_v1.sqlite: a run store in schema version 1, written by the store code as it was
before schema 2 (commit 2870739, `git show 2870739:instrumented_adam/telemetry/store.py`).

    git show 2870739:instrumented_adam/telemetry/store.py > /tmp/old_store.py
    python tests/data/make_store_v1.py /tmp/old_store.py tests/data/store_v1.sqlite

Two runs (one with two param groups, one branch of it) with steps, step groups, epochs, layers,
metrics and a checkpoint row: what tests/test_store.py reads back with the current code.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
from pathlib import Path


def build(old_store: str, out: str) -> None:
    spec = importlib.util.spec_from_file_location("instrumented_adam.telemetry._store_v1", old_store)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "instrumented_adam.telemetry"
    spec.loader.exec_module(module)
    Path(out).unlink(missing_ok=True)
    store = module.RunStore(out, create=True)
    figures = ("update_norm", "grad_norm", "param_norm")
    store.ensure_columns("steps", figures)
    store.ensure_columns("step_groups", figures)
    store.ensure_columns("epochs", ("step_norm", "cos_prev", "update_norm_mean"))
    store.ensure_columns("layer_epochs", ("step_norm",))
    base = store.create_run("base", hyperparameters={"lr": 1e-3, "betas": [0.9, 0.999]}, seed=3, optimizer="Adam", num_groups=2)
    columns = ("step", "epoch", *module.HYPER_COLUMNS, *figures)
    for epoch in range(3):
        rows, group_rows = [], []
        for i in range(4):
            step = epoch * 4 + i + 1
            rows.append((step, epoch, 1e-3, 0.0, 0.9, 0.999, 1e-8, 0.1 / step, 1.0 + step, 10.0 + 0.5 * step))
            for grp, lr in enumerate((1e-3, 5e-3)):
                group_rows.append((step, grp, epoch, lr, 0.0, 0.9, 0.999, 1e-8, 0.05 / step, 0.5 + step, 5.0 + step))
        store.write_steps(base, columns, rows, group_rows)
        store.write_epoch(
            base,
            {"epoch": epoch, "step": 4 * epoch + 4, "num_steps": 4, "recorded_steps": 4, "wall_time": 0.25,
             "lr": 1e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
             "step_norm": 0.3 / (epoch + 1), "cos_prev": float("nan") if epoch == 0 else 0.5, "update_norm_mean": 0.02},
            ("layer_index", "layer", "grp", "numel", "step_norm"),
            [(0, "0.weight", 0, 40, 0.2), (1, "0.bias", 1, 4, 0.1)],
            {"train_loss": 1.0 / (epoch + 1), "val_loss": 1.5 / (epoch + 1)},
        )
    store.record_checkpoint(base, 8, 2, Path(out).with_name("base-epoch1.pt"))
    store.set_status(base, "finished")
    branch = store.create_run("branch", parent_run=base, branch_epoch=2, branch_step=8, optimizer="Adam", num_groups=1)
    store.write_steps(branch, columns, [(9, 2, 2e-3, 0.0, 0.9, 0.999, 1e-8, 0.01, 1.0, 11.0)])
    store.set_status(branch, "failed")
    store.close()
    conn = sqlite3.connect(out)  # one self-contained file: no -wal beside it in the repository
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("VACUUM")
    conn.close()


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2])
