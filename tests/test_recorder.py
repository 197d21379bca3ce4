"""The recorder writes what the optimizer measured: step rows, epoch rows, layers, metrics."""

from __future__ import annotations

import collections
import math

import numpy as np
import pandas as pd
import pytest
import torch

import instrumented_adam as ia
from instrumented_adam.telemetry.recorder import AGGREGATES, EPOCH_FIGURES, STEP_FIGURES, Recorder
from instrumented_adam.telemetry.store import MetricClashError, RunStore


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int, after_step=None) -> list:
    out = []
    for _ in range(n):
        x = torch.randn(8, 6)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step is not None:
            out.append(after_step())
    return out


def overall_figures(opt) -> dict[str, float]:
    return {k: float(v[0]) for k, v in opt.last_step_statistics().derived("overall").items()}


def assert_frame_close(actual: pd.DataFrame, expected: pd.DataFrame, rtol: float = 1e-12) -> None:
    for col in expected.columns:
        np.testing.assert_allclose(actual[col].to_numpy(float), expected[col].to_numpy(float), rtol=rtol, atol=0, err_msg=col)


def test_step_rows_equal_the_optimizers_figures(tmp_path):
    model = make_model()
    opt = ia.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    rec = Recorder(opt, tmp_path / "s.sqlite", run_name="r", model=model, flush_every=5)
    expected = []
    for _ in range(3):
        expected += train_steps(model, opt, 7, lambda: overall_figures(opt))
        rec.end_epoch()
    rec.close()
    steps = RunStore(tmp_path / "s.sqlite").steps("r")
    assert list(steps.columns[:8]) == ["run_id", "step", "epoch", "lr", "weight_decay", "beta1", "beta2", "eps"]
    assert set(STEP_FIGURES) <= set(steps.columns)
    assert steps["step"].tolist() == list(range(1, 22))
    assert steps["epoch"].tolist() == [0] * 7 + [1] * 7 + [2] * 7
    assert (steps["lr"] == 3e-3).all() and (steps["weight_decay"] == 0.1).all()
    assert (steps["beta1"] == 0.9).all() and (steps["beta2"] == 0.999).all() and (steps["eps"] == 1e-8).all()
    assert_frame_close(steps, pd.DataFrame(expected))
    assert steps["cos_update_prev_epoch"].iloc[:7].isna().all()  # no previous epoch yet
    assert steps["cos_update_prev_epoch"].iloc[7:].notna().all()


def test_per_group_rows_and_hyperparameters_in_force(tmp_path):
    model = make_model()
    opt = ia.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 1e-2, "weight_decay": 0.5}], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)  # lr changes every step
    rec = Recorder(opt, tmp_path / "g.sqlite", run_name="g", flush_every=4)
    expected, lrs = [], []
    for _ in range(6):
        train_steps(model, opt, 1)
        derived = opt.last_step_statistics().derived("group")
        expected += [{k: float(v[g]) for k, v in derived.items()} for g in range(2)]
        lrs.append([group["lr"] for group in opt.param_groups])
        sched.step()
    rec.end_epoch()
    rec.close()
    store = RunStore(tmp_path / "g.sqlite")
    groups = store.step_groups("g")
    assert groups[["step", "grp"]].values.tolist() == [[s, g] for s in range(1, 7) for g in range(2)]
    assert_frame_close(groups, pd.DataFrame(expected))
    assert groups["lr"].tolist() == [lr for pair in lrs for lr in pair]
    assert groups["weight_decay"].tolist() == [0.0, 0.5] * 6
    steps = store.steps("g")
    assert steps["lr"].tolist() == [pair[0] for pair in lrs]  # the steps table carries group 0's settings
    assert store.epochs("g")["lr"].iloc[0] == lrs[-1][0]  # the lr of the epoch's last step


def test_single_group_runs_appear_as_group_zero(tmp_path):
    model = make_model()
    opt = ia.Adam(model.parameters())
    rec = Recorder(opt, tmp_path / "one.sqlite", run_name="one")
    train_steps(model, opt, 3)
    rec.close()
    store = RunStore(tmp_path / "one.sqlite")
    assert store.conn.execute("SELECT COUNT(*) FROM step_groups").fetchone()[0] == 0  # not stored twice
    groups = store.step_groups("one")
    assert groups["grp"].tolist() == [0, 0, 0]
    assert_frame_close(groups, store.steps("one")[list(STEP_FIGURES)])


def test_epoch_rows_equal_an_independent_computation(tmp_path):
    model = make_model()
    opt = ia.Adam(model.parameters(), lr=1e-2, epoch_buffers="exact")  # exact figures (compact: test_epoch_buffers.py)
    rec = Recorder(opt, tmp_path / "e.sqlite", run_name="e", model=model, flush_every=3)
    snapshots = [torch.cat([p.detach().double().flatten() for p in model.parameters()])]
    returned = []
    for epoch in range(4):
        train_steps(model, opt, 5 + epoch)
        returned.append(rec.end_epoch(train_loss=float(epoch), val_accuracy=0.5 + epoch / 10))
        snapshots.append(torch.cat([p.detach().double().flatten() for p in model.parameters()]))
    rec.close()
    store = RunStore(tmp_path / "e.sqlite")
    epochs, steps = store.epochs("e"), store.steps("e")
    assert epochs["epoch"].tolist() == [0, 1, 2, 3]
    assert epochs["step"].tolist() == [5, 11, 18, 26]
    assert epochs["num_steps"].tolist() == [5, 6, 7, 8] == epochs["recorded_steps"].tolist()
    # mean/min/max of the step rows, computed by pandas from the stored steps
    grouped = steps.groupby("epoch")[list(STEP_FIGURES)]
    for agg in ("mean", "min", "max"):
        independent = grouped.agg(agg)
        for f in STEP_FIGURES:
            np.testing.assert_allclose(epochs[f"{f}_{agg}"], independent[f], rtol=1e-12, atol=0, err_msg=f"{f}_{agg}")
    # the epoch geometry, from parameter snapshots
    for k in range(4):
        s = snapshots[k + 1] - snapshots[k]
        np.testing.assert_allclose(epochs["step_norm"][k], s.norm().item(), rtol=1e-9)
        np.testing.assert_allclose(epochs["distance_from_init"][k], (snapshots[k + 1] - snapshots[0]).norm().item(), rtol=1e-9)
        if k > 0:
            prev = snapshots[k] - snapshots[k - 1]
            np.testing.assert_allclose(epochs["cos_prev"][k], (s @ prev / (s.norm() * prev.norm())).item(), rtol=1e-6)
    assert math.isnan(epochs["cos_prev"][0])
    assert epochs["train_loss"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert np.allclose(epochs["val_accuracy"], [0.5, 0.6, 0.7, 0.8])
    # end_epoch returns the row it wrote
    assert returned[2]["step_norm"] == epochs["step_norm"][2] and returned[2]["train_loss"] == 2.0
    assert set(EPOCH_FIGURES) <= set(epochs.columns) and set(AGGREGATES) <= set(epochs.columns)


def test_layer_rows(tmp_path):
    model = make_model()
    opt = ia.Adam(model.parameters(), lr=1e-2)
    rec = Recorder(opt, tmp_path / "l.sqlite", run_name="l", model=model)
    train_steps(model, opt, 4)
    last = {k: v.tolist() for k, v in opt.last_step_statistics().derived("tensor").items()}
    rec.end_epoch()
    rec.close()
    layers = RunStore(tmp_path / "l.sqlite").layers("l")
    names = [n for n, _ in model.named_parameters()]
    assert layers["layer"].tolist() == names
    assert layers["numel"].tolist() == [p.numel() for p in model.parameters()]
    for f in STEP_FIGURES:
        np.testing.assert_allclose(layers[f], last[f], rtol=1e-12, atol=0, err_msg=f)
    epoch = RunStore(tmp_path / "l.sqlite").epochs("l")
    np.testing.assert_allclose((layers["step_norm"] ** 2).sum(), epoch["step_norm"][0] ** 2, rtol=1e-12)


def test_layers_without_a_model_are_numbered(tmp_path):
    model = make_model()
    opt = ia.Adam(model.parameters())
    rec = Recorder(opt, tmp_path / "n.sqlite", run_name="n")
    train_steps(model, opt, 2)
    rec.end_epoch()
    rec.close()
    assert RunStore(tmp_path / "n.sqlite").layers("n")["layer"].tolist() == [f"param.{i}" for i in range(4)]


def test_step_every_and_flush_every(tmp_path):
    model = make_model()
    opt = ia.Adam(model.parameters())
    path = tmp_path / "k.sqlite"
    rec = Recorder(opt, path, run_name="k", step_every=3, flush_every=6)
    reader = RunStore(path)
    train_steps(model, opt, 5)
    assert reader.steps("k").empty  # buffered on the device, nothing flushed yet
    train_steps(model, opt, 1)
    assert reader.steps("k")["step"].tolist() == [3, 6]  # flushed after 6 steps (2 recorded rows)
    train_steps(model, opt, 4)
    row = rec.end_epoch()
    assert reader.steps("k")["step"].tolist() == [3, 6, 9]
    assert row["recorded_steps"] == 3 and row["num_steps"] == 10
    rec.close()


def test_the_step_hook_is_a_few_device_ops_without_reads(tmp_path):
    """The per-step capture: a constant handful of ops, whatever the number of tensors, and
    nothing that reads a value back to the host (which would synchronise with a GPU)."""
    from conftest import OpCounter

    def step_ops(model, opt):
        x = torch.randn(8, 6)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        with OpCounter(opt) as mode:
            opt.step()
        return mode.counts()

    hook_ops = []
    for width in (2, 40):
        model = torch.nn.Sequential(torch.nn.Linear(6, 4), *[torch.nn.Linear(4, 4) for _ in range(width)])
        plain, recorded = ia.Adam(model.parameters()), ia.Adam(model.parameters())
        rec = Recorder(recorded, tmp_path / f"h{width}.sqlite", run_name="h", flush_every=1000)
        for _ in range(2):  # the ring exists after the first recorded step
            without, with_hook = step_ops(model, plain), step_ops(model, recorded)
        hook_ops.append(with_hook - without)
        assert not (without - with_hook)
        rec.close()
    assert hook_ops[0] == hook_ops[1]  # independent of the number of tensors
    # The ring slot (a view) and one copy of the optimizer's live buffer into it: no second copy;
    # host reads only of the CPU step counter (the step number of the row).
    device_ops = collections.Counter({k: v for k, v in hook_ops[0].items() if not k.endswith("(step counter)")})
    assert device_ops == collections.Counter({"aten.select.int": 1, "aten.copy_.default": 1}), hook_ops[0]
    assert not any("_local_scalar_dense" in op or "item" in op for op in device_ops)


def test_tensor_learning_rate(tmp_path):
    model = make_model()
    opt = ia.Adam(model.parameters(), lr=torch.tensor(2e-3))
    rec = Recorder(opt, tmp_path / "t.sqlite", run_name="t", flush_every=2)
    for i in range(5):
        train_steps(model, opt, 1)
        opt.param_groups[0]["lr"].fill_(2e-3 * (i + 2))  # changed in place, as a scheduler would
    rec.end_epoch()
    rec.close()
    lrs = RunStore(tmp_path / "t.sqlite").steps("t")["lr"].to_numpy()
    np.testing.assert_allclose(lrs, [np.float32(2e-3 * (i + 1)) for i in range(5)], rtol=1e-6)


def test_metric_clashes_are_refused_before_anything_changes(tmp_path):
    model = make_model()
    opt = ia.Adam(model.parameters())
    rec = Recorder(opt, tmp_path / "m.sqlite", run_name="m")
    train_steps(model, opt, 2)
    for bad in ({"lr": 1.0}, {"step_norm": 1.0}, {"grad_norm_mean": 1.0}, {"epoch": 3}, {"grad_norm": 0.1}):
        with pytest.raises(MetricClashError, match="built-in column"):
            rec.end_epoch(**bad)
    rec.log_metrics(val_loss=0.5)
    with pytest.raises(MetricClashError, match="already logged"):
        rec.end_epoch(val_loss=0.4)
    with pytest.raises(MetricClashError, match="already logged"):
        rec.log_metrics({"val_loss": 0.3})
    with pytest.raises(ValueError, match="not valid"):
        rec.end_epoch(**{"1x": 1.0})
    with pytest.raises(ValueError, match="must be a number"):
        rec.end_epoch(note="hello")
    assert opt.epochs_done == 0  # the refused calls did not end the epoch
    store = RunStore(tmp_path / "m.sqlite")
    assert store.epochs("m").empty and store.metrics("m").empty
    rec.end_epoch(train_loss=torch.tensor(0.25))
    assert store.metrics("m").set_index("name")["value"].to_dict() == {"train_loss": 0.25, "val_loss": 0.5}
    rec.log_metrics(epoch=0, test_accuracy=0.9)  # a late metric for the ended epoch
    with pytest.raises(MetricClashError, match="already logged"):
        rec.log_metrics(epoch=0, test_accuracy=0.8)
    assert store.epochs("m")["test_accuracy"].tolist() == [0.9]
    assert len(store.steps("m")) == 2  # nothing lost
    rec.close()


def test_lifecycle_and_lineage(tmp_path):
    path = tmp_path / "life.sqlite"
    model = make_model()
    opt = ia.Adam(model.parameters())
    with Recorder(opt, path, run_name="ok", hyperparameters={"lr": 1e-3, "batch": 8}, seed=3):
        train_steps(model, opt, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with Recorder(opt, path, run_name="bad", parent_run="ok", branch_epoch=0):
            raise RuntimeError("boom")
    runs = RunStore(path).runs()
    assert runs["status"].tolist() == ["finished", "failed"]
    assert runs["hyperparameters"][0] == {"lr": 1e-3, "batch": 8}
    assert runs["seed"][0] == 3 and runs["parent_run"][1] == 1 and runs["branch_epoch"][1] == 0
    assert isinstance(runs["code_version"][0], str) and runs["code_version"][0]
    assert RunStore(path).lineage("bad") == [1, 2]
    with pytest.raises(TypeError, match="instrumented_adam optimizer"):
        Recorder(torch.optim.Adam(model.parameters()), path)
    with pytest.raises(ValueError, match="statistics=True"):
        Recorder(ia.Adam(model.parameters(), statistics=False), path)
