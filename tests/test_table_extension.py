"""Adding a statistic to csrc/stats_table.h is enough (issue 8, "What it must show").

The extension is built, into a temporary copy of the package, with -DIA_TEST_EXTRA_STAT: that
macro adds one X() entry to the table (grad_sum, Σ g, combined as a sum) and its per-element
contribution in csrc/stats_accumulate.h, and nothing else. A subprocess using that copy trains a
few steps with instrumented_adam.Adam and a Recorder into a RunStore and checks that grad_sum
reaches the optimizer's statistics, the recorder's step rows, the store's steps()/epochs()
DataFrames and the CSV export, equal to an independent float64 Σ g. Only the DEFAULT copy of the
CPU kernel is compiled (IA_CPU_ISAS=DEFAULT) to keep the build short (~60 s on 2 cores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TRAIN = textwrap.dedent(
    r"""
    import sys
    from pathlib import Path

    import pandas as pd
    import torch

    import instrumented_adam as ia
    from instrumented_adam.core import table
    from instrumented_adam.telemetry.export import to_csv
    from instrumented_adam.telemetry.recorder import Recorder
    from instrumented_adam.telemetry.store import RunStore

    assert Path(ia.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), ia.__file__
    assert "grad_sum" in table.STAT_NAMES, table.STAT_NAMES
    spec = table.STEP_STATS[table.STAT_INDEX["grad_sum"]]
    assert spec.combine == "sum" and spec.definition == "Σ g (test builds only)", spec

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.Tanh(), torch.nn.Linear(33, 3))
    opt = ia.Adam(model.parameters(), lr=1e-2)
    store_path = Path(sys.argv[1]) / "run.sqlite"
    rec = Recorder(opt, store_path, run_name="extra", model=model, flush_every=2)
    x, y = torch.randn(64, 7), torch.randn(64, 3)
    expected = []  # per step: Σ g over all parameters, in float64 from the gradients themselves
    for epoch in range(2):
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            grad_total = sum(float(p.grad.double().sum()) for p in model.parameters())
            opt.step()
            expected.append(grad_total)
            per_tensor = opt.last_step_statistics()["grad_sum"]
            own = [float(p.grad.double().sum()) for p in model.parameters()]
            torch.testing.assert_close(per_tensor.double(), torch.tensor(own, dtype=torch.float64), rtol=1e-6, atol=1e-9)
        rec.end_epoch(train_loss=1.0)
    rec.close()

    def close(a, b):
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))

    with RunStore(store_path) as store:
        steps = store.steps("extra")
        assert "grad_sum" in steps.columns, list(steps.columns)
        assert len(steps) == len(expected), (len(steps), len(expected))
        for got, want in zip(steps["grad_sum"], expected):
            assert close(float(got), want), (got, want)
        epochs = store.epochs("extra")
        columns = [c for c in epochs.columns if c.startswith("grad_sum")]
        assert columns, list(epochs.columns)
        if "grad_sum_mean" in epochs.columns:
            for e, row in epochs.iterrows():
                want = sum(expected[3 * e: 3 * e + 3]) / 3
                assert close(float(row["grad_sum_mean"]), want), (row["grad_sum_mean"], want)
        paths = to_csv(store, Path(sys.argv[1]) / "csv", "extra")
    csv_steps = pd.read_csv(paths["steps"])
    for got, want in zip(csv_steps["grad_sum"], expected):
        assert close(float(got), want), (got, want)
    assert any(c.startswith("grad_sum") for c in pd.read_csv(paths["epochs"]).columns)
    print("grad_sum ok", len(expected), "steps;", "epoch columns:", ", ".join(columns))
    """
)


def test_a_statistic_added_to_the_table_reaches_rows_store_and_export(tmp_path):
    copy = tmp_path / "pkg"
    copy.mkdir()
    shutil.copy(ROOT / "setup.py", copy / "setup.py")
    shutil.copytree(ROOT / "csrc", copy / "csrc")
    shutil.copytree(ROOT / "instrumented_adam", copy / "instrumented_adam",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = dict(os.environ, IA_EXTRA_DEFINES="-DIA_TEST_EXTRA_STAT", IA_CPU_ISAS="DEFAULT", IA_BUILD_CUDA="0")
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp", str(tmp_path / "build")],
        cwd=copy, env=env, capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(copy)
    run = subprocess.run([sys.executable, "-c", TRAIN, str(copy)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "grad_sum ok" in run.stdout

    # The tree's own build does not have the test statistic.
    from instrumented_adam.core import table

    assert "grad_sum" not in table.STAT_NAMES
