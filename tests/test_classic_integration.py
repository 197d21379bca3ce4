"""SGD, RMSprop and Adagrad through the recorder, the store, the report and the demo command line:
each run records its own optimizer's hyperparameters and the figures its family defines, and the
report overlays runs of different optimizers on one task."""

from __future__ import annotations

import math

import numpy as np
import pytest

import torch

import instrumented_adam as ia
from instrumented_adam.demo import cli
from instrumented_adam.demo.tasks import TASKS, TrainConfig, train_task
from instrumented_adam.telemetry.store import RunStore

OWN_COLUMNS = {"sgd": ("momentum", "dampening", "nesterov"), "rmsprop": ("alpha", "centered", "momentum", "eps"),
               "adagrad": ("lr_decay", "initial_accumulator_value", "eps")}


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adagrad"])
def test_recorded_run_has_its_optimizers_columns(tmp_path, name):
    result = train_task("linreg", TrainConfig(optimizer=name, epochs=40), tmp_path / "s.sqlite")
    store = RunStore(tmp_path / "s.sqlite")
    steps = store.steps(result.run_id)
    for column in OWN_COLUMNS[name]:
        assert steps[column].notna().all(), column
    assert "beta1" not in steps or steps["beta1"].isna().all()  # not an Adam run
    if name == "sgd":
        assert (steps["momentum"] == 0.9).all()
    epochs = store.epochs(result.run_id)
    assert len(epochs) == 40
    # Trained: the linear model approaches the least-squares fit.
    data = TASKS["linreg"].data(0)
    x, y = data.x_train.double().numpy(), data.y_train.double().numpy()
    slope, _ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), y, rcond=None)[0]
    assert abs(result.model.slope.item() - slope) < 0.1
    assert math.isfinite(result.final["train_loss"])


def test_demo_overlays_optimizers_on_one_task(tmp_path, capsys):
    status = cli.main(["demo", "--task", "linreg", "--optimizer", "adam", "sgd", "rmsprop", "adagrad", "--epochs", "3",
                       "--momentum", "0.5", "--nesterov", "--out", str(tmp_path / "out"), "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0
    for name in ("linreg-adam", "linreg-sgd", "linreg-rmsprop", "linreg-adagrad"):
        assert f"== {name}:" in out
    assert "sgd lr=0.02 momentum=0.5 nesterov" in out
    runs = RunStore(tmp_path / "out" / "demo.sqlite").runs()
    assert runs["optimizer"].tolist() == ["Adam", "SGD", "RMSprop", "Adagrad"]
    page = (tmp_path / "out" / "report.html").read_text()
    for label in ("1:linreg-adam", "2:linreg-sgd", "3:linreg-rmsprop", "4:linreg-adagrad"):
        assert label in page


@pytest.mark.parametrize("cls", ["SGD", "RMSprop", "Adagrad"])
def test_histograms_are_refused_clearly(cls):
    with pytest.raises(ValueError, match="does not take histograms yet"):
        getattr(ia, cls)([torch.nn.Parameter(torch.zeros(3))], lr=0.1, histogram_every=10)


@pytest.mark.parametrize("cls", ["SGD", "RMSprop", "Adagrad"])
def test_epoch_buffers_default_exact_and_compact_on_cpu(cls):
    """Exact by default (the CUDA classic kernels read only exact ones); compact on request keeps
    the previous epoch's step in bf16 on CPU (its accuracy: test_epoch_buffers.py)."""
    opt = getattr(ia, cls)([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    assert opt.epoch_buffers == "exact" and opt.distance_from_init
    p = torch.nn.Parameter(torch.randn(3))
    compact = getattr(ia, cls)([p], lr=0.1, epoch_buffers="compact")
    for _ in range(2):
        p.grad = torch.randn(3)
        compact.step()
        compact.end_epoch()
    assert compact.state[p]["prev_epoch_step"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="Invalid epoch_buffers value"):
        getattr(ia, cls)([torch.nn.Parameter(torch.zeros(3))], lr=0.1, epoch_buffers="bf16")
