"""Crash safety and resume: a run killed with SIGKILL leaves a sound store, and a run resumed from
its last checkpoint ends with exactly the rows of an uninterrupted run.

Run as a script (`python test_resume.py train <args as JSON>`), it is the training process.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import instrumented_adam as ia
from instrumented_adam.telemetry.checkpoint import CheckpointError, seed_everything
from instrumented_adam.telemetry.recorder import Recorder
from instrumented_adam.telemetry.store import RunStore

# Columns that legitimately differ between two runs of the same training: ids and wall clocks.
_VOLATILE = {"run_id", "wall_time"}

EPOCHS, STEPS, BATCH = 4, 6, 16


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(10, 24), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(24, 3))


def train(db: str, ckpt_dir: str, name: str = "run", resume: str | None = None, pause_at: list | None = None,
          flush_every: int = 4, seed: int = 7) -> None:
    """A small training with dropout, shuffling and an LR schedule (all RNG- and state-dependent),
    a checkpoint at every epoch end; pauses forever at (epoch, step) `pause_at` to be killed."""
    torch.set_num_threads(1)  # bitwise reproducible reductions
    seed_everything(seed)
    data_gen = torch.Generator().manual_seed(1234)
    x = torch.randn(STEPS * BATCH, 10, generator=data_gen)
    y = torch.randint(0, 3, (STEPS * BATCH,), generator=data_gen)
    model = make_model()
    opt = ia.AdamW([{"params": model[0].parameters()}, {"params": model[3].parameters(), "lr": 3e-3}], lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    if resume:
        rec = Recorder.resume(resume, opt, model, db)
        sched.load_state_dict(rec.extra["scheduler"])
        start = rec.epoch
    else:
        rec = Recorder(opt, db, run_name=name, model=model, seed=seed, flush_every=flush_every)
        start = 0
    for epoch in range(start, EPOCHS):
        perm = torch.randperm(len(x))
        total = torch.zeros(())
        for i in range(STEPS):
            idx = perm[i * BATCH : (i + 1) * BATCH]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach()
            if pause_at is not None and [epoch, i] == list(pause_at):
                rows = RunStore(db).steps(name)["step"].tolist()
                print("PAUSED", json.dumps(rows), flush=True)
                time.sleep(600)
        sched.step()
        model.eval()
        with torch.no_grad():
            val = torch.nn.functional.cross_entropy(model(x), y).item()
            acc = (model(x).argmax(1) == y).double().mean().item()
        model.train()
        rec.end_epoch(train_loss=total.item() / STEPS, val_loss=val, val_accuracy=acc)
        rec.save_checkpoint(Path(ckpt_dir) / f"epoch{epoch}.pt", model, extra={"scheduler": sched.state_dict()})
        print("EPOCH", epoch, flush=True)
    rec.close()


def _env() -> dict[str, str]:
    # The subprocess imports the same instrumented_adam as this test process.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(ia.__file__).parent.parent), env.get("PYTHONPATH")) if p)
    return env


def _spawn(**kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "train", json.dumps(kwargs)], stdout=subprocess.PIPE, text=True, env=_env())


def _frames(db: Path, name: str = "run") -> dict[str, pd.DataFrame]:
    with RunStore(db) as store:
        frames = {t: getattr(store, t)(name) for t in ("steps", "step_groups", "epochs", "layers", "metrics")}
    return {t: df.drop(columns=[c for c in _VOLATILE if c in df.columns]) for t, df in frames.items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """The reference: the same training, never interrupted (run in this process)."""
    d = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    try:
        train(str(d / "ref.sqlite"), str(d))
    finally:
        torch.set_num_threads(threads)
    return _frames(d / "ref.sqlite")


def test_kill_mid_epoch_then_resume_gives_the_rows_of_an_uninterrupted_run(tmp_path, uninterrupted):
    db = tmp_path / "exp.sqlite"
    proc = _spawn(db=str(db), ckpt_dir=str(tmp_path), pause_at=[2, 3], flush_every=4)
    try:
        flushed = None
        for line in proc.stdout:
            if line.startswith("PAUSED"):
                flushed = json.loads(line.split(" ", 1)[1])
                break
        assert flushed is not None, "the training process did not reach the pause point"
        proc.send_signal(signal.SIGKILL)  # mid-epoch 2, rows of epoch 2 partly flushed
    finally:
        proc.kill()
        proc.wait(timeout=30)

    # Crash safety: the file is sound and holds everything flushed before the kill.
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with RunStore(db) as store:
        assert store.integrity_check() == "ok"
        steps = store.steps("run")
        assert steps["step"].tolist() == flushed
        assert flushed == list(range(1, 2 * STEPS + 4 + 1))  # 2 epochs + 4 steps: flushes of 4
        assert store.epochs("run")["epoch"].tolist() == [0, 1]
        assert store.runs()["status"].tolist() == ["running"]
        pd.testing.assert_frame_equal(
            steps.drop(columns=["run_id"]), uninterrupted["steps"].iloc[: len(flushed)], check_exact=True
        )

    # Resume from the last checkpoint (end of epoch 1): rows beyond it are dropped, the rest re-recorded.
    resumed = _spawn(db=str(db), ckpt_dir=str(tmp_path), resume=str(tmp_path / "epoch1.pt"))
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out
    got = _frames(db)
    for table, expected in uninterrupted.items():
        pd.testing.assert_frame_equal(got[table], expected, check_exact=True, obj=table)
    with RunStore(db) as store:
        assert store.runs()["status"].tolist() == ["finished"]
        assert len(store.runs()) == 1
        assert store.checkpoints("run")["epochs_done"].tolist() == [1, 2, 3, 4]


def test_a_kill_while_writing_never_corrupts_the_store(tmp_path):
    """SIGKILL at an arbitrary moment of a run flushing every step: the store opens, is sound,
    and its step rows are a gap-free prefix."""
    db = tmp_path / "busy.sqlite"
    proc = _spawn(db=str(db), ckpt_dir=str(tmp_path), flush_every=1)
    try:
        for line in proc.stdout:
            if line.startswith("EPOCH 1"):
                break
        time.sleep(0.05)  # somewhere inside epoch 2's writes (or a checkpoint)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with RunStore(db) as store:
        assert store.integrity_check() == "ok"
        steps = store.steps("run")["step"].tolist()
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2 * STEPS
        epochs = store.epochs("run")
        assert epochs["epoch"].tolist() == list(range(len(epochs))) and len(epochs) >= 2
        assert epochs["val_loss"].notna().all()  # an epoch row never without its metrics


def _small_run(tmp_path: Path) -> tuple[Path, Path]:
    db, ckpt = tmp_path / "s.sqlite", tmp_path / "s.pt"
    torch.manual_seed(0)
    model = make_model()
    opt = ia.Adam(model.parameters())
    rec = Recorder(opt, db, run_name="s", model=model)
    for _ in range(3):
        model(torch.randn(4, 10)).sum().backward()
        opt.step()
    rec.end_epoch(val_loss=1.0)
    rec.save_checkpoint(ckpt, model)
    for _ in range(2):
        model(torch.randn(4, 10)).sum().backward()
        opt.step()
    rec.flush()  # rows beyond the checkpoint: a resume would drop them, a refused one must not
    return db, ckpt


def test_a_checkpoint_of_another_model_is_refused_and_nothing_is_lost(tmp_path):
    db, ckpt = _small_run(tmp_path)
    before = _frames(db, "s")
    other = torch.nn.Sequential(torch.nn.Linear(10, 24), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(24, 5))
    weights = [p.detach().clone() for p in other.parameters()]
    opt = ia.Adam(other.parameters())
    with pytest.raises(CheckpointError, match=r"another model: '3.bias': checkpoint has shape \[3\].*model \[5\]"):
        Recorder.resume(ckpt, opt, other, db)
    assert all(torch.equal(a, b) for a, b in zip(weights, other.parameters()))  # model untouched
    assert opt.steps_done == 0 and not opt.state
    after = _frames(db, "s")
    for table in before:
        pd.testing.assert_frame_equal(after[table], before[table])
    assert len(after["steps"]) == 5


def test_bad_checkpoint_files_and_wrong_stores(tmp_path):
    db, ckpt = _small_run(tmp_path)
    plain = tmp_path / "plain.pt"
    torch.save(make_model().state_dict(), plain)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    model = make_model()
    for path, message in ((plain, "no 'instrumented_adam.checkpoint' marker"), (text, "cannot load it")):
        with pytest.raises(CheckpointError, match=message):
            Recorder.resume(path, ia.Adam(model.parameters()), model, db)
    with pytest.raises(FileNotFoundError):
        Recorder.resume(tmp_path / "missing.pt", ia.Adam(model.parameters()), model, db)
    elsewhere = tmp_path / "elsewhere.sqlite"
    RunStore(elsewhere, create=True).close()
    with pytest.raises(CheckpointError, match="not in .*elsewhere.sqlite"):
        Recorder.resume(ckpt, ia.Adam(model.parameters()), model, elsewhere)
    with pytest.raises(CheckpointError, match="does not fit"):
        Recorder.resume(ckpt, ia.Adam([{"params": [model[0].weight]}, {"params": [model[0].bias]}]), model, db)
    assert len(RunStore(db).steps("s")) == 5


def test_branch_from_a_checkpoint(tmp_path):
    db, ckpt = _small_run(tmp_path)
    model = make_model()
    opt = ia.Adam(model.parameters())
    rec = Recorder.branch(ckpt, opt, model, db, run_name="s-lr2", overrides={"lr": 2e-3})
    for _ in range(2):
        model(torch.randn(4, 10)).sum().backward()
        opt.step()
    rec.end_epoch(val_loss=0.5)
    rec.close()
    with RunStore(db) as store:
        runs = store.runs().set_index("name")
        assert runs.loc["s-lr2", "parent_run"] == runs.loc["s", "run_id"]
        assert runs.loc["s-lr2", "branch_epoch"] == 1 and runs.loc["s-lr2", "branch_step"] == 3
        assert runs.loc["s-lr2", "hyperparameters"]["lr"] == 2e-3
        steps = store.steps("s-lr2")
        assert steps["step"].tolist() == [4, 5] and steps["epoch"].tolist() == [1, 1]
        assert (steps["lr"] == 2e-3).all()
        assert store.epochs("s-lr2")["epoch"].tolist() == [1]
        assert len(store.steps("s")) == 5  # the parent is untouched
    # Switching algorithm: the Adam state does not load into Adamax, so start its state afresh.
    model = make_model()
    rec = Recorder.branch(ckpt, ia.Adamax(model.parameters()), model, db, run_name="s-adamax", load_optimizer_state=False)
    model(torch.randn(4, 10)).sum().backward()
    rec.optimizer.step()
    rec.close()
    assert RunStore(db).steps("s-adamax")["step"].tolist() == [4]


def test_a_mid_epoch_checkpoint_of_the_previous_recorder_resumes(tmp_path):
    """Checkpoints written before the recorder's split carry every step's figures of the epoch in
    progress ("epoch_figures") and Adam's hyperparameters as a list, and no store position: they
    resume, and the epoch row aggregates the old steps with the new ones."""
    from instrumented_adam.telemetry.checkpoint import atomic_save, load_checkpoint

    db, ckpt = tmp_path / "s.sqlite", tmp_path / "mid.pt"
    torch.manual_seed(0)
    model = make_model()
    opt = ia.Adam(model.parameters(), lr=1e-3)
    rec = Recorder(opt, db, run_name="old", model=model)
    for _ in range(3):
        model(torch.randn(4, 10)).sum().backward()
        opt.step()
    rec.save_checkpoint(ckpt, model)
    rec.close("failed")
    payload = load_checkpoint(ckpt)
    position = payload["recorder"]
    with RunStore(db) as store:
        figures = store.steps("old")[list(position["step_figures"])].to_numpy()
    for key in ("epoch_aggregates", "store_position", "diverged"):
        del position[key]
    position["epoch_figures"] = torch.from_numpy(figures)
    position["last_hyper"] = [[1e-3, 0.0, 0.9, 0.999, 1e-8]]
    atomic_save(payload, ckpt)
    model = make_model()
    opt = ia.Adam(model.parameters(), lr=1e-3)
    rec = Recorder.resume(ckpt, opt, model, db)
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    row = rec.end_epoch()
    rec.close()
    with RunStore(db) as store:
        steps = store.steps("old")
        assert steps["step"].tolist() == [1, 2, 3, 4]
        assert row["recorded_steps"] == 4
        assert row["grad_norm_mean"] == pytest.approx(steps["grad_norm"].mean(), rel=1e-12)
        assert row["grad_norm_max"] == steps["grad_norm"].max()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "train":
    train(**json.loads(sys.argv[2]))
