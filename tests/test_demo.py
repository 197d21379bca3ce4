"""The demo's tasks: they converge where they must, record what the report needs, run end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instrumented_adam.demo import cli
from instrumented_adam.telemetry.store import RunStore
from instrumented_adam.demo.tasks import LOSS_SURFACE_KEY, TASKS, TrainConfig, quadratic_mse, train_task


@pytest.fixture(autouse=True)
def one_thread():
    # The demo's tensors are tiny: extra threads only add synchronisation (the CLI does the same).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_linear_regression_converges_to_least_squares(tmp_path):
    result = train_task("linreg", TrainConfig(), tmp_path / "s.sqlite")  # the demo's defaults (Adam)
    data = TASKS["linreg"].data(0)
    x, y = data.x_train.double().numpy(), data.y_train.double().numpy()
    expected = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), y, rcond=None)[0]
    got = np.array([result.model.slope.item(), result.model.intercept.item()])
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert result.final["train_loss"] == pytest.approx(np.mean((expected[0] * x + expected[1] - y) ** 2), rel=1e-4)

    store = RunStore(tmp_path / "s.sqlite")
    epochs = store.epochs(result.run_id)
    assert len(epochs) == result.config.epochs == 100
    np.testing.assert_allclose(epochs[["slope", "intercept"]].iloc[-1], got, rtol=1e-6)
    surface = store.run_info(result.run_id)["hyperparameters"][LOSS_SURFACE_KEY]
    np.testing.assert_allclose(surface["optimum"], expected, rtol=1e-9)
    assert surface["start"] == [-1.0, 2.0]
    # The stored moments reproduce the recorded training loss all along the path (float32 model).
    np.testing.assert_allclose(
        quadratic_mse(surface["moments"], epochs["slope"], epochs["intercept"]), epochs["train_loss"], rtol=1e-4
    )


def test_digits_mlp_reaches_95_percent(tmp_path):
    result = train_task("digits", TrainConfig(), tmp_path / "s.sqlite")
    assert result.final["val_accuracy"] >= 0.95
    store = RunStore(tmp_path / "s.sqlite")
    epochs = store.epochs(result.run_id)
    assert len(epochs) == 30 and epochs["val_accuracy"].iloc[-1] == result.final["val_accuracy"]
    layers = store.layers(result.run_id)
    assert list(layers["layer"].unique()) == [f"fc{i}.{k}" for i in range(1, 5) for k in ("weight", "bias")]
    assert store.runs().iloc[0]["status"] == "finished"


def test_configs_are_validated():
    for bad in (dict(optimizer="lbfgs"), dict(lr=-1.0), dict(epochs=0), dict(betas=(0.9, 1.0)), dict(schedule="step")):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_a_failing_run_is_marked_failed(tmp_path):
    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_task("linreg", TrainConfig(epochs=3), tmp_path / "s.sqlite", on_epoch=stop)
    runs = RunStore(tmp_path / "s.sqlite").runs()
    assert runs["status"].tolist() == ["failed"]


def test_demo_command_end_to_end(tmp_path, capsys):
    threads = torch.get_num_threads()
    status = cli.main(["demo", "--epochs", "3", "--out", str(tmp_path / "out"), "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0
    assert torch.get_num_threads() == threads  # the demo restores the thread count
    for name in ("linreg-adam", "linreg-adamax", "digits-adam", "digits-adamax"):
        assert f"== {name}:" in out
    header = "epoch  train_loss    val_loss"
    assert out.count(header) == 4
    for column in ("lr", "step_norm", "cos_prev", "upd/param", "eff_lr", "val_acc"):
        assert column in out
    report = (tmp_path / "out" / "report.html").resolve()
    assert "Report written in" in out and str(report) in out
    assert report.stat().st_size > 10_000
    runs = RunStore(tmp_path / "out" / "demo.sqlite").runs()
    assert runs["name"].tolist() == ["linreg-adam", "linreg-adamax", "digits-adam", "digits-adamax"]
    assert (runs["status"] == "finished").all()

    # A second demo appends to the store; its report shows only its own run.
    status = cli.main(["demo", "--task", "linreg", "--optimizer", "adamw", "--epochs", "2", "--out", str(tmp_path / "out"),
                       "--no-progress", "--print-every", "2"])
    out = capsys.readouterr().out
    assert status == 0 and "4 earlier run(s) kept" in out
    page = report.read_text()
    assert "5:linreg-adamw" in page and "1:linreg-adam<" not in page


def test_demo_command_runs_the_vertex_finding_task(tmp_path, capsys, monkeypatch):
    from instrumented_adam.demo.tasks import PVFinderTask

    # The registered task at a tenth of its size (the same code path, seconds instead of minutes).
    small = PVFinderTask(n_train=64, n_val=32, n_bins=400, widths=(4, 4), progress=False)
    monkeypatch.setitem(TASKS, "pvfinder", small)
    status = cli.main(["demo", "--task", "pvfinder", "--optimizer", "adam", "--epochs", "2", "--out",
                       str(tmp_path / "out"), "--no-progress", "--no-report"])
    out = capsys.readouterr().out
    assert status == 0 and "== pvfinder-adam:" in out
    store = RunStore(tmp_path / "out" / "demo.sqlite")
    epochs = store.epochs(store.runs()["run_id"].iloc[0])
    assert len(epochs) == 2 and {"val_efficiency", "val_false_positives"} <= set(epochs.columns)


def test_demo_all_means_the_fast_tasks():
    from instrumented_adam.demo.tasks import DEFAULT_DEMO_TASKS

    assert DEFAULT_DEMO_TASKS == ("linreg", "digits") and {"pvfinder", "pvfinder-unet"} <= set(TASKS)
