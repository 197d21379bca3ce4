"""Exports: TensorBoard event files with the usual tags, CSV and Parquet equal to the store."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import instrumented_adam as ia
from instrumented_adam.telemetry.export import to_csv, to_parquet, to_tensorboard
from instrumented_adam.telemetry.recorder import Recorder
from instrumented_adam.telemetry.store import RunStore


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "exp.sqlite"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    for name, groups in (("one", None), ("two", 2)):
        params = (
            [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 5e-3}]
            if groups else model.parameters()
        )
        opt = ia.Adam(params, lr=1e-3)
        rec = Recorder(opt, path, run_name=name, model=model, flush_every=3)
        for epoch in range(3):
            for _ in range(4):
                model(torch.randn(3, 5)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
            rec.end_epoch(train_loss=1.0 / (epoch + 1), val_loss=2.0 / (epoch + 1))
        rec.log_metrics(epoch=2, test_accuracy=0.75)
        rec.close()
    return path


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_tags_and_values(store_path, tmp_path):
    dirs = to_tensorboard(store_path, tmp_path / "tb")
    assert [d.name for d in dirs] == ["1-one", "2-two"]
    one = _scalars(dirs[0])
    store = RunStore(store_path)
    steps, epochs = store.steps("one"), store.epochs("one")
    assert [s for s, _ in one["lr-Adam"]] == steps["step"].tolist()
    assert {"lr-Adam-momentum", "lr-Adam-weight_decay", "optimizer/beta2", "optimizer/eps"} <= set(one)
    assert np.allclose([v for _, v in one["optimizer/update_norm"]], steps["update_norm"], rtol=1e-6)
    assert [s for s, _ in one["epoch/step_norm"]] == epochs["step"].tolist()  # epoch rows at their last step
    assert np.allclose([v for _, v in one["epoch/cos_prev"]], epochs["cos_prev"].iloc[1:], rtol=1e-6)  # NaN left out
    assert np.allclose([v for _, v in one["val_loss"]], epochs["val_loss"], rtol=1e-6)
    assert [v for _, v in one["epoch"]] == [0.0, 1.0, 2.0]
    assert [v for _, v in one["test_accuracy"]] == [0.75]
    assert "epoch/update_norm_mean" in one and "layers/0.weight/step_norm" in one
    two = _scalars(dirs[1])
    assert {"lr-Adam/pg1", "lr-Adam/pg2", "lr-Adam/pg2-momentum", "optimizer/pg2/update_norm"} <= set(two)
    assert [v for _, v in two["lr-Adam/pg2"]] == pytest.approx([5e-3] * 12)


def test_live_tensorboard_mirror(tmp_path):
    model = torch.nn.Linear(3, 1)
    opt = ia.Adam(model.parameters())
    rec = Recorder(opt, tmp_path / "live.sqlite", run_name="live", tensorboard=tmp_path / "tb")
    for _ in range(3):
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
    rec.end_epoch(val_loss=0.5)
    rec.close()
    tags = _scalars(tmp_path / "tb")
    assert [s for s, _ in tags["optimizer/grad_norm"]] == [1, 2, 3]
    assert tags["val_loss"] == [(3, 0.5)]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_flat_files_equal_the_store(store_path, tmp_path, fmt):
    paths = (to_csv if fmt == "csv" else to_parquet)(store_path, tmp_path / fmt)
    assert set(paths) == {"runs", "steps", "step_groups", "epochs", "layers", "metrics"}
    read = pd.read_csv if fmt == "csv" else pd.read_parquet
    store = RunStore(store_path)
    for name in ("steps", "step_groups", "epochs", "layers", "metrics"):
        expected = getattr(store, name)()
        got = read(paths[name])
        assert list(got.columns) == list(expected.columns), name
        pd.testing.assert_frame_equal(got, expected, check_dtype=False, rtol=1e-15 if fmt == "csv" else 0, obj=name)
    runs = read(paths["runs"])
    assert json.loads(runs["hyperparameters"][1])["lr"] == 1e-3
    assert json.loads(runs["hyperparameter_columns"][0]) == list(store.hyperparameter_columns(1))
    one = read((to_csv if fmt == "csv" else to_parquet)(store_path, tmp_path / f"{fmt}-one", run="two")["steps"])
    assert set(one["run_id"]) == {2}


def test_export_never_writes_outside_the_output_directory(tmp_path):
    """Issue 10 item 6. Reproduction on the landed code: a run named 'a/../../x' exported to
    TensorBoard wrote its event files two levels above --out."""
    path = tmp_path / "names.sqlite"
    with RunStore(path, create=True) as store:
        for name in ("a/../../x", "../up", "..", "/abs/path", "ok name"):
            run = store.create_run(name)
            store.write_steps(run, ("step", "epoch", "lr", "update_norm"), [(1, 0, 1e-3, 0.5)])
    out = tmp_path / "deep" / "out"
    before = {p for p in tmp_path.rglob("*")}
    dirs = to_tensorboard(path, out)
    assert [d.name for d in dirs] == ["1-a_.._.._x", "2-.._up", "3-..", "4-_abs_path", "5-ok_name"]
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(out in p.parents or p == out or p in out.parents for p in created)
    assert all(d.parent == out for d in dirs)
    assert [v for _, v in _scalars(dirs[0])["optimizer/update_norm"]] == [0.5]


def test_tensorboard_tags_follow_the_runs_own_hyperparameters(tmp_path):
    """Issue 8: an SGD run's momentum is Lightning's lr-SGD-momentum and dampening its own tag;
    nothing depends on Adam's column list."""
    path = tmp_path / "sgd.sqlite"
    with RunStore(path, create=True) as store:
        run = store.create_run("sgd", optimizer="SGD", num_groups=1)
        store.write_steps(run, ("step", "epoch", "lr", "momentum", "dampening", "update_norm"), [(1, 0, 0.1, 0.9, 0.1, 0.5)])
    tags = _scalars(to_tensorboard(path, tmp_path / "tb")[0])
    assert tags["lr-SGD"] == [(1, pytest.approx(0.1))] and tags["lr-SGD-momentum"] == [(1, pytest.approx(0.9))]
    assert tags["optimizer/dampening"] == [(1, pytest.approx(0.1))] and "optimizer/momentum" not in tags
