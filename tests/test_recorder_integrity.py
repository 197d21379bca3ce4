"""Honest telemetry (issue 10, recorder side): each test's docstring keeps the reproduction on the
code before the fix."""

from __future__ import annotations

import io
import math
import shutil
import warnings

import numpy as np
import pytest
import torch

import instrumented_adam as ia
from instrumented_adam.telemetry.checkpoint import load_checkpoint
from instrumented_adam.telemetry.recorder import Recorder
from instrumented_adam.telemetry.store import RunLeaseError, RunStore, StoreGapError


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(6, 5)).pow(2).mean().backward()
        opt.step()


# ---- 1. step numbers after a torch.optim checkpoint ------------------------------------------
def test_steps_continue_from_a_torch_adamw_checkpoint(tmp_path):
    """Reproduction: torch.optim.AdamW trained 300 steps, its state_dict loaded into ia.AdamW,
    Recorder attached, 2 steps: the store held steps [1, 2] (the optimizer's own count is 300)."""
    model = make_model()
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps(model, torch_opt, 300)
    opt = ia.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(torch_opt.state_dict())
    with Recorder(opt, tmp_path / "s.sqlite", run_name="r", model=model) as rec:
        steps(model, opt, 2)
        rec.end_epoch()
    with RunStore(tmp_path / "s.sqlite") as store:
        assert store.steps("r")["step"].tolist() == [301, 302]
        epoch = store.epochs("r").iloc[0]
        assert epoch["step"] == 302 and epoch["num_steps"] == 2


# ---- 2. skipped steps, add_param_group, two recorders ----------------------------------------
def test_a_step_gradscaler_skipped_is_recorded_as_skipped(tmp_path):
    """Reproduction: GradScaler, one step with an inf gradient: its row read grad_norm 0,
    param_norm 0, nonfinite_grads 0 (a row of zeros) and the epoch's grad_norm_min was 0."""
    model = make_model()
    opt = ia.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    rec = Recorder(opt, tmp_path / "s.sqlite", run_name="amp", model=model, flush_every=2)
    for i in range(5):
        opt.zero_grad()
        scaler.scale(model(torch.randn(6, 5)).pow(2).mean()).backward()
        if i == 2:
            model[0].weight.grad[0, :3] = math.inf
        scaler.step(opt)
        scaler.update()
    rec.end_epoch()
    rec.close()
    with RunStore(tmp_path / "s.sqlite") as store:
        s = store.steps("amp")
        assert s["skipped"].tolist() == [0, 0, 1, 0, 0]
        assert s["grad_scale"].tolist() == [1024.0, 1024.0, 1024.0, 512.0, 512.0]
        skipped = s.iloc[2]
        assert skipped["nonfinite_grads"] == 3
        assert math.isnan(skipped["grad_norm"]) and math.isnan(skipped["param_norm"])
        kept = s[s["skipped"] == 0]
        assert (kept["grad_norm"] > 0).all() and (kept["nonfinite_grads"] == 0).all()
        e = store.epochs("amp").iloc[0]
        assert e["skipped_steps"] == 1 and e["recorded_steps"] == 5
        assert e["grad_norm_min"] == kept["grad_norm"].min()
        assert e["grad_norm_mean"] == pytest.approx(kept["grad_norm"].mean(), rel=1e-12)
        assert e["nonfinite_grads_max"] == 0  # the skipped step is not in the aggregates


def test_add_param_group_mid_run_gives_no_duplicated_group_rows(tmp_path):
    """Reproduction: 3 steps with one group, add_param_group, 2 steps: step_groups() held 7 rows
    (steps 4 and 5 twice as group 0) and runs.num_groups stayed 1."""
    model = make_model()
    opt = ia.Adam(model[0].parameters(), lr=1e-3)
    rec = Recorder(opt, tmp_path / "s.sqlite", run_name="g", model=model)
    steps(model, opt, 3)
    opt.add_param_group({"params": model[2].parameters(), "lr": 1e-2})
    steps(model, opt, 2)
    rec.end_epoch()
    rec.close()
    with RunStore(tmp_path / "s.sqlite") as store:
        g = store.step_groups("g")
        assert list(zip(g["step"], g["grp"])) == [(1, 0), (2, 0), (3, 0), (4, 0), (4, 1), (5, 0), (5, 1)]
        assert g.loc[g["grp"] == 1, "lr"].tolist() == [1e-2, 1e-2]
        assert store.run_info("g")["num_groups"] == 2
        s = store.steps("g")
        assert s["step"].tolist() == [1, 2, 3, 4, 5]
        first = g[g["grp"] == 0].set_index("step")["grad_norm"]
        assert first.loc[[1, 2, 3]].tolist() == s.set_index("step")["grad_norm"].loc[[1, 2, 3]].tolist()


def test_a_second_recorder_on_one_optimizer_is_refused(tmp_path):
    """Reproduction: two recorders on one optimizer: the second recorded an epoch step norm of 0
    (the first one's end_epoch had consumed the epoch)."""
    model = make_model()
    opt = ia.Adam(model.parameters())
    first = Recorder(opt, tmp_path / "s.sqlite", run_name="a")
    with pytest.raises(RuntimeError, match="already has an open recorder"):
        Recorder(opt, tmp_path / "s.sqlite", run_name="b")
    with RunStore(tmp_path / "s.sqlite") as store:
        assert store.runs()["name"].tolist() == ["a"]  # the refused one created no run
    first.close()
    Recorder(opt, tmp_path / "s.sqlite", run_name="b").close()  # after close: fine


# ---- 3. bounded memory -----------------------------------------------------------------------
def _recorder_entry_bytes(path) -> int:
    buffer = io.BytesIO()
    torch.save(load_checkpoint(path)["recorder"], buffer)
    return buffer.tell()


def test_mid_epoch_bookkeeping_does_not_grow_with_the_epoch(tmp_path):
    """Reproduction: a mid-epoch checkpoint's recorder entry carried every step's figures:
    ~100 B more per step (10 steps: ~3 kB, 400 steps: ~45 kB)."""
    model = make_model()
    opt = ia.Adam(model.parameters())
    rec = Recorder(opt, tmp_path / "s.sqlite", run_name="long", model=model, flush_every=7)
    steps(model, opt, 10)
    short = _recorder_entry_bytes(rec.save_checkpoint(tmp_path / "a.pt"))
    steps(model, opt, 390)
    long = _recorder_entry_bytes(rec.save_checkpoint(tmp_path / "b.pt"))
    assert long == short
    row = rec.end_epoch()
    rec.close()
    with RunStore(tmp_path / "s.sqlite") as store:
        s = store.steps("long")
        assert row["recorded_steps"] == 400
        for f in ("grad_norm", "update_norm", "eff_lr_max"):
            assert row[f"{f}_mean"] == pytest.approx(s[f].mean(), rel=1e-12)
            assert row[f"{f}_min"] == s[f].min() and row[f"{f}_max"] == s[f].max()


# ---- 4. a late metric after a checkpoint -----------------------------------------------------
def test_a_late_metric_after_the_checkpoint_does_not_block_it_after_resume(tmp_path):
    """Reproduction: end_epoch, checkpoint, log_metrics(epoch=0, test_loss=...), crash; the
    resumed run logs the same late metric: MetricClashError (the first one survived truncation)."""
    db, ckpt = tmp_path / "s.sqlite", tmp_path / "c.pt"
    model = make_model()
    opt = ia.Adam(model.parameters())
    rec = Recorder(opt, db, run_name="late", model=model)
    steps(model, opt, 3)
    rec.end_epoch(val_loss=1.0)
    rec.save_checkpoint(ckpt)
    rec.log_metrics(epoch=0, test_loss=0.5)
    rec.store.close()  # the crash: nothing more from this process's recorder
    model = make_model()
    opt = ia.Adam(model.parameters())
    resumed = Recorder.resume(ckpt, opt, model, db)
    resumed.log_metrics(epoch=0, test_loss=0.25)
    resumed.close()
    with RunStore(db) as store:
        m = store.metrics("late").set_index("name")["value"]
        assert m["test_loss"] == 0.25 and m["val_loss"] == 1.0


# ---- 5. leases, store positions, divergence --------------------------------------------------
def _checkpointed_run(tmp_path):
    db, ckpt = tmp_path / "s.sqlite", tmp_path / "c.pt"
    model = make_model()
    opt = ia.Adam(model.parameters())
    rec = Recorder(opt, db, run_name="r", model=model)
    steps(model, opt, 4)
    rec.end_epoch(val_loss=1.0)
    return db, ckpt, model, opt, rec


def test_the_recorder_holds_the_runs_lease_until_close(tmp_path):
    """Reproduction: a second process resuming the run while the first still recorded truncated
    the first one's rows, then died with a raw IntegrityError inside opt.step()."""
    db, ckpt, model, opt, rec = _checkpointed_run(tmp_path)
    rec.save_checkpoint(ckpt)
    with RunStore(db) as store:
        assert store.lease("r") is not None
    model2 = make_model()
    with pytest.raises(RunLeaseError, match="is held by writer"):
        Recorder.resume(ckpt, ia.Adam(model2.parameters()), model2, takeover=False)
    with pytest.raises(RunLeaseError, match="is held by writer"):  # a live holder: takeover does not help
        Recorder.resume(ckpt, ia.Adam(model2.parameters()), model2, takeover=True)
    steps(model, opt, 2)
    rec.close()  # the first writer was not disturbed
    with RunStore(db) as store:
        assert store.lease("r") is None
        assert store.steps("r")["step"].tolist() == [1, 2, 3, 4, 5, 6]
    resumed = Recorder.resume(ckpt, ia.Adam(model2.parameters()), model2)  # free now
    resumed.close()


def test_the_step_hook_keeps_the_lease_alive_between_flushes(tmp_path, monkeypatch):
    """Reproduction: with flush_every larger than the steps of the lease's expiry time, the
    run's lease expired while the training was alive (takeover=True would then fence it)."""
    import time as _time

    model = make_model()
    opt = ia.Adam(model.parameters())
    rec = Recorder(opt, tmp_path / "s.sqlite", run_name="hb", model=model, flush_every=1000)
    monkeypatch.setattr(rec, "heartbeat_seconds", 0.0)
    with RunStore(tmp_path / "s.sqlite") as store:
        before = store.lease("hb")["heartbeat"]
        _time.sleep(1.1)  # the store refreshes a heartbeat at most once a second
        steps(model, opt, 2)  # no flush: only the hook's heartbeat writes
        assert store.steps("hb").empty
        assert store.lease("hb")["heartbeat"] > before
    rec.close()


def test_a_checkpoint_records_the_store_position_and_resume_checks_it(tmp_path):
    """Reproduction: a resume against an older copy of the store (one lacking the checkpoint's
    epoch row) was accepted and left a permanent gap."""
    db, ckpt, model, opt, rec = _checkpointed_run(tmp_path)
    old_copy = tmp_path / "old.sqlite"
    with RunStore(db) as store:
        store.sync()
    shutil.copy(db, old_copy)  # before the second epoch
    steps(model, opt, 4)
    rec.end_epoch(val_loss=0.5)
    rec.save_checkpoint(ckpt)
    rec.close()
    position = load_checkpoint(ckpt)["recorder"]["store_position"]
    assert position["last_step"] == 8 and position["last_epoch"] == 1 and position["rows"]["epochs"] == 2
    model2 = make_model()
    opt2 = ia.Adam(model2.parameters())
    with pytest.raises(StoreGapError, match="on_gap='mark'"):
        Recorder.resume(ckpt, opt2, model2, old_copy)
    assert opt2.steps_done == 0  # refused before anything was loaded
    rec2 = Recorder.resume(ckpt, opt2, model2, old_copy, on_gap="mark")
    steps(model2, opt2, 2)
    rec2.close()
    with RunStore(old_copy) as store:
        gaps = store.gaps("r")
        assert len(gaps) == 1
        assert (gaps["from_step"].iloc[0], gaps["to_step"].iloc[0]) == (5, 8)
        assert (gaps["from_epoch"].iloc[0], gaps["to_epoch"].iloc[0]) == (1, 1)
        assert store.steps("r")["step"].tolist() == [1, 2, 3, 4, 9, 10]


def test_non_finite_loss_or_parameters_mark_the_run_diverged(tmp_path):
    """Reproduction: a run whose val_loss was NaN (or whose parameters went NaN) ended 'finished'."""
    db = tmp_path / "s.sqlite"
    model = make_model()
    opt = ia.Adam(model.parameters())
    with Recorder(opt, db, run_name="loss", model=model) as rec, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        steps(model, opt, 2)
        rec.end_epoch(val_loss=1.0)
        steps(model, opt, 2)
        rec.end_epoch(val_loss=float("nan"))
    model = make_model()
    opt = ia.Adam(model.parameters())
    with Recorder(opt, db, run_name="params", model=model, flush_every=1) as rec:
        steps(model, opt, 2)
        with torch.no_grad():
            model[0].weight[0, 0] = math.inf
        with pytest.warns(RuntimeWarning, match="diverged"):
            steps(model, opt, 1)
        rec.end_epoch()
    with RunStore(db) as store:
        runs = store.runs().set_index("name")
        assert runs.loc["loss", "status"] == "diverged"
        assert runs.loc["loss", "status_detail"] == "val_loss = nan at epoch 1 (step 4)"
        assert runs.loc["params", "status"] == "diverged"
        assert "param_norm" in runs.loc["params", "status_detail"] and "step 3 (epoch 0)" in runs.loc["params", "status_detail"]


# ---- 6. end_epoch before any step ------------------------------------------------------------
def test_end_epoch_before_any_step_is_a_no_op(tmp_path):
    """Reproduction: end_epoch() at iteration 0 (nanoGPT evaluates there) recorded an empty epoch
    with step norm 0 and left the next epoch's angle (cos_prev) empty."""
    model = make_model()
    opt = ia.Adam(model.parameters())
    rec = Recorder(opt, tmp_path / "s.sqlite", run_name="e", model=model)
    with pytest.warns(RuntimeWarning, match="no optimizer step since the last epoch"):
        assert rec.end_epoch() == {}
    with pytest.raises(ValueError, match="no optimizer step since the last epoch"):
        rec.end_epoch(val_loss=2.0)
    assert opt.epochs_done == 0 and rec.epoch == 0
    steps(model, opt, 3)
    rec.end_epoch(val_loss=1.0)
    with pytest.warns(RuntimeWarning):
        rec.end_epoch()  # twice in a row: the same
    steps(model, opt, 3)
    rec.end_epoch(val_loss=0.5)
    rec.close()
    with RunStore(tmp_path / "s.sqlite") as store:
        e = store.epochs("e")
        assert e["epoch"].tolist() == [0, 1] and e["num_steps"].tolist() == [3, 3]
        assert (e["step_norm"] > 0).all() and np.isfinite(e["cos_prev"].iloc[1])
