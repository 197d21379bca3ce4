"""Health diagnostics: planted faults are found at the right epoch, healthy runs raise no alarm."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from instrumented_adam.analysis import health
from instrumented_adam.analysis.relations import RunData, derive_epoch_series
from instrumented_adam.demo import cli
from instrumented_adam.demo.tasks import TrainConfig, make_optimizer, train_task
from instrumented_adam.telemetry.recorder import Recorder
from instrumented_adam.telemetry.store import RunStore


def run_data(train, val=None, *, steps=None, layers=None, status="finished") -> RunData:
    n = len(train)
    epochs = pd.DataFrame({"epoch": np.arange(n), "step": (np.arange(n) + 1) * 10, "num_steps": 10, "train_loss": train})
    if val is not None:
        epochs["val_loss"] = val
    steps = steps if steps is not None else pd.DataFrame({"step": [1], "epoch": [0], "nonfinite_grads": [0.0], "param_norm": [1.0]})
    return RunData(1, "r", {"status": status}, derive_epoch_series(epochs), steps,
                   layers if layers is not None else pd.DataFrame())


def decaying(n=60, floor=0.1, seed=0):
    rng = np.random.default_rng(seed)
    return floor + np.exp(-np.arange(n) / 15) * (1 + 0.01 * rng.normal(size=n))


def kinds(h: health.RunHealth) -> dict[str, health.Finding]:
    return {f.kind: f for f in h.findings}


def test_a_healthy_curve_raises_nothing():
    h = health.diagnose(run_data(decaying(), decaying(seed=1) + 0.02))
    assert h.healthy and set(kinds(h)) == {"best_epoch"}, h.text()


def test_loss_spike_found_at_its_epoch():
    train = decaying()
    train[33] *= 6
    h = health.diagnose(run_data(train))
    assert kinds(h)["loss_spike"].epoch == 33 and len(h.of_kind("loss_spike")) == 1
    assert h.healthy  # a spike it recovered from is a warning, not an error


def test_overfitting_onset_and_best_epoch():
    n = 80
    train = decaying(n)
    val = 0.3 + np.exp(-np.arange(n) / 10)
    val[40:] += 0.004 * (np.arange(40) ** 1.2)  # rises from epoch 41 on
    best = int(np.argmin(val))
    h = health.diagnose(run_data(train, val))
    found = kinds(h)
    assert found["best_epoch"].epoch == best
    assert found["overfitting"].epoch == best + 1 and "while the training loss fell" in found["overfitting"].message
    # Validation that only wobbles within the tolerance is not overfitting.
    calm = health.diagnose(run_data(train, 0.3 + np.exp(-np.arange(n) / 10) + 0.001 * np.sin(np.arange(n))))
    assert not calm.of_kind("overfitting")


def test_plateau_found_where_it_starts():
    train = np.r_[np.geomspace(1.0, 0.2, 30), np.full(25, 0.2)]
    h = health.diagnose(run_data(train))
    assert kinds(h)["plateau"].epoch == 29


def test_divergence_and_nonfinite_loss():
    train = np.r_[decaying(10), [np.nan, np.nan]]
    h = health.diagnose(run_data(train))
    assert not h.healthy
    assert kinds(h)["nonfinite_loss"].epoch == 10 and "divergence" in kinds(h)
    rising = health.diagnose(run_data(np.linspace(1.0, 3.0, 12)))
    assert "divergence" in kinds(rising) and not rising.healthy


def test_skipped_amp_steps_and_their_absence():
    steps = pd.DataFrame({"step": np.arange(1, 41), "epoch": np.repeat(np.arange(4), 10), "skipped": 0.0,
                          "nonfinite_grads": 0.0, "param_norm": 1.0})
    steps.loc[steps["step"] == 17, "skipped"] = 1.0
    h = health.diagnose(run_data(decaying(4), steps=steps))
    assert kinds(h)["skipped_steps"].step == 17 and kinds(h)["skipped_steps"].epoch == 1
    assert not health.diagnose(run_data(decaying(4), steps=steps.drop(columns="skipped"))).of_kind("skipped_steps")


def test_frozen_layer_found():
    n = 12
    layers = pd.DataFrame({"epoch": np.repeat(np.arange(n), 2), "layer_index": np.tile([0, 1], n),
                           "layer": np.tile(["fc1.weight", "fc2.weight"], n), "step_norm": 0.1})
    layers.loc[(layers["layer"] == "fc2.weight") & (layers["epoch"] >= 7), "step_norm"] = 0.0
    h = health.diagnose(run_data(decaying(n), layers=layers))
    assert kinds(h)["frozen_layers"].layers == ("fc2.weight",) and kinds(h)["frozen_layers"].epoch == 7


def test_status_from_the_store_is_shown():
    h = health.diagnose(run_data(decaying(5), status="diverged"))
    assert not h.healthy and "marks the run diverged" in h.text()


@pytest.fixture(scope="module")
def inf_store(tmp_path_factory):
    """A real run whose gradient has one inf element at step 30 (the last of epoch 2, 10-step epochs: the per-layer rows show it)."""
    path = tmp_path_factory.mktemp("health") / "s.sqlite"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = make_optimizer(model.parameters(), TrainConfig(lr=1e-2, weight_decay=0.0))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    with RunStore(path, create=True) as store:
        rec = Recorder(opt, store, run_name="inf", model=model)
        step = 0
        for epoch in range(5):
            for _ in range(10):
                step += 1
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                if step == 30:
                    model[2].weight.grad[0, 3] = math.inf
                opt.step()
            with torch.no_grad():
                rec.end_epoch(train_loss=torch.nn.functional.mse_loss(model(x), y).item())
        rec.close()
    train_task("linreg", TrainConfig(epochs=30), path, run_name="healthy")
    return path


def test_inf_gradient_found_at_its_step_and_layer(inf_store):
    with RunStore(inf_store) as store:
        bad, good = health.check_runs(store)
    grads = kinds(bad)["nonfinite_grads"]
    assert grads.step == 30 and grads.epoch == 2 and grads.layers == ("2.weight",)
    assert not bad.healthy and kinds(bad)["nonfinite_params"].step == 30
    assert good.healthy and not [f for f in good.findings if f.severity != "info"], good.text()


def test_check_command_exit_status(inf_store, capsys):
    assert cli.main(["check", str(inf_store), "healthy"]) == 0
    out = capsys.readouterr().out
    assert "run 2:healthy (finished): healthy" in out
    assert cli.main(["check", str(inf_store)]) == 1
    out = capsys.readouterr().out
    # The recorder marks a run that went non-finite 'diverged' (older recorders left it 'finished').
    assert re.search(r"run 1:inf \((finished|diverged)\): UNHEALTHY", out), out
    assert "from step 30 (epoch 2)" in out and "2.weight" in out


def test_skipped_steps_from_epoch_rows_when_step_rows_are_thinned():
    run = run_data(decaying(5))
    run.epochs["skipped_steps"] = [0, 0, 0, 2, 0]
    assert kinds(health.diagnose(run))["skipped_steps"].epoch == 3
