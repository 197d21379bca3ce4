"""Randomized faults (issue 10): a recorded training killed with SIGKILL at random moments,
including while the store is being created, while a checkpoint is being saved and while a resume
truncates, keeps a sound store whose rows are a prefix of the uninterrupted run's, and resuming
from the latest checkpoint ends with exactly the uninterrupted run's rows. Then a requeue: two
jobs resuming the same run, the second refused with RunLeaseError naming the first, and a takeover
after expiry that fences the first out (it writes nothing more).

The kill moments come from `IA_FAULT_SEED` (default: the clock; the seed is in every failure
message). Bounded: about a dozen short processes, well under two minutes on two cores.

Run as a script (`python test_faults.py train <args as JSON>`), it is the training process. It
prints markers (CREATING, RESUMING, SAVING, EPOCH, DONE) that the test kills around.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

EPOCHS, STEPS, BATCH = 3, 5, 8
MID_EPOCH_SAVE = 2  # a checkpoint after this many steps of every epoch, besides the epoch ends
_VOLATILE = {"run_id", "wall_time"}
_TABLES = ("steps", "step_groups", "epochs", "layers", "metrics")


def train(db: str, ckpt_dir: str, resume: str | None = None, takeover: bool = False, wait_for: str | None = None) -> None:
    """A small training whose every random draw is reproducible across a resume at any checkpoint
    (mid-epoch ones too): per-epoch data order from its own generator, dropout from the global RNG
    that checkpoints restore, a per-epoch LR schedule and the running loss sum in `extra`."""
    import torch

    import instrumented_adam as ia
    from instrumented_adam.telemetry.checkpoint import seed_everything
    from instrumented_adam.telemetry.recorder import Recorder

    torch.set_num_threads(1)  # bitwise reproducible reductions
    seed_everything(11)
    data = torch.Generator().manual_seed(99)
    x = torch.randn(STEPS * BATCH, 6, generator=data)
    y = torch.randint(0, 3, (STEPS * BATCH,), generator=data)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 3))
    opt = ia.AdamW([{"params": model[0].parameters()}, {"params": model[3].parameters(), "lr": 4e-3}], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
    total = torch.zeros((), dtype=torch.float64)
    if resume:
        print("RESUMING", flush=True)
        # takeover: a requeued job taking over a run whose old writer's lease expired
        rec = Recorder.resume(resume, opt, model, db, takeover=takeover)
        sched.load_state_dict(rec.extra["scheduler"])
        total = rec.extra["loss_sum"]
        print("RESUMED", os.getpid(), flush=True)
    else:
        print("CREATING", flush=True)
        rec = Recorder(opt, db, run_name="run", model=model, seed=11, flush_every=2)
    if wait_for is not None:
        while not Path(wait_for).exists():
            time.sleep(0.02)
    start_epoch = rec.epoch
    done_in_epoch = opt.steps_done - start_epoch * STEPS
    for epoch in range(start_epoch, EPOCHS):
        order = torch.randperm(STEPS * BATCH, generator=torch.Generator().manual_seed(1000 + epoch))
        for i in range(done_in_epoch, STEPS):
            idx = order[i * BATCH : (i + 1) * BATCH]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach().double()
            if i + 1 == MID_EPOCH_SAVE:
                print("SAVING", flush=True)
                rec.save_checkpoint(Path(ckpt_dir) / f"step{opt.steps_done:04d}.pt", model,
                                    extra={"scheduler": sched.state_dict(), "loss_sum": total.clone()})
        done_in_epoch = 0
        sched.step()
        rec.end_epoch(train_loss=total.item() / STEPS)
        total = torch.zeros((), dtype=torch.float64)
        print("SAVING", flush=True)
        rec.save_checkpoint(Path(ckpt_dir) / f"step{opt.steps_done:04d}.pt", model,
                            extra={"scheduler": sched.state_dict(), "loss_sum": total.clone()})
        print("EPOCH", epoch, flush=True)
    rec.close()
    print("DONE", flush=True)


def _env() -> dict[str, str]:
    import instrumented_adam as ia

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(ia.__file__).parent.parent), env.get("PYTHONPATH")) if p)
    return env


def _spawn(**kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "train", json.dumps(kwargs)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def _frames(db: Path) -> dict[str, pd.DataFrame]:
    from instrumented_adam.telemetry.store import RunStore

    with RunStore(db, readonly=True) as store:
        frames = {t: getattr(store, t)("run") for t in _TABLES}
    return {t: df.drop(columns=[c for c in _VOLATILE if c in df.columns]) for t, df in frames.items()}


def _latest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint file that loads and verifies (a kill never leaves a partial one)."""
    from instrumented_adam.telemetry.checkpoint import load_checkpoint

    for path in sorted(directory.glob("step*.pt"), reverse=True):
        load_checkpoint(path)  # raises on a partial or corrupt file: that would be a bug
        return path
    return None


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """The uninterrupted run, in a process like the killed ones."""
    d = tmp_path_factory.mktemp("reference")
    proc = _spawn(db=str(d / "ref.sqlite"), ckpt_dir=str(d))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return _frames(d / "ref.sqlite")


def _check_sound_prefix(db: Path, reference: dict[str, pd.DataFrame], why: str) -> int:
    """Integrity, and the prefix property: every row present is the uninterrupted run's row."""
    from instrumented_adam.telemetry.store import RunStore, UnknownRunError

    if not db.exists():
        return 0
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok", why
    conn.close()
    try:
        frames = _frames(db)
    except UnknownRunError:
        return 0  # killed before the run was created
    except Exception as e:  # an empty file (killed before initialisation) is the only other state
        assert db.stat().st_size == 0 or "empty SQLite file" in str(e), f"{why}: {e}"
        return 0
    steps = frames["steps"]
    assert steps["step"].tolist() == list(range(1, len(steps) + 1)), f"{why}: steps not a gap-free prefix"
    for table in _TABLES:
        got, expected = frames[table], reference[table]
        if got.empty:  # (an empty frame lacks the metric columns that rows bring)
            continue
        assert set(got.columns) <= set(expected.columns), f"{why}: {table} columns"
        prefix = expected.iloc[: len(got)][list(got.columns)].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, prefix, check_exact=True, obj=f"{why}: {table}")
    with RunStore(db, readonly=True) as store:
        assert store.integrity_check() == "ok"
    return len(steps)


def test_random_kills_keep_a_sound_prefix_and_resume_exactly(tmp_path, reference):
    seed = int(os.environ.get("IA_FAULT_SEED", time.time_ns() % 2**31))
    rng = random.Random(seed)
    db = tmp_path / "faults.sqlite"
    modes = ["create", "save", "resume", "save", "random", "random"]
    history = []
    for attempt, mode in enumerate(modes):
        latest = _latest_checkpoint(tmp_path)
        proc = _spawn(db=str(db), ckpt_dir=str(tmp_path), resume=str(latest) if latest else None)
        marker = {"create": "CREATING", "resume": "RESUMING", "save": "SAVING"}.get(mode)
        nth = rng.randint(1, 3) if mode == "save" else 1
        delay = rng.uniform(0, 0.03) if marker else rng.uniform(0, 0.6)
        seen = 0
        for line in proc.stdout:
            if line.startswith("DONE"):
                break
            if marker is None and line.startswith(("CREATING", "RESUMING")):
                break
            if marker is not None and line.startswith(marker):
                seen += 1
                if seen >= nth:
                    break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        why = f"seed {seed}, attempt {attempt} ({mode} #{nth} + {delay * 1000:.0f} ms, from {latest and latest.name})"
        history.append(why)
        _check_sound_prefix(db, reference, why)
    latest = _latest_checkpoint(tmp_path)
    proc = _spawn(db=str(db), ckpt_dir=str(tmp_path), resume=str(latest) if latest else None)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"seed {seed}: final resume failed: {err[-2000:]}"
    got = _frames(db)
    for table, expected in reference.items():
        pd.testing.assert_frame_equal(got[table], expected, check_exact=True, obj=f"seed {seed} {history}: {table}")
    from instrumented_adam.telemetry.store import RunStore

    with RunStore(db, readonly=True) as store:
        run = store.run_info("run")
        assert run["status"] == "finished" and store.lease("run") is None
        assert not [p for p in tmp_path.iterdir() if p.name.endswith("ia-tmp")]


def _read_until(proc: subprocess.Popen, prefix: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix!r} from the process: {proc.stderr.read()[-2000:]}")


def test_requeue_two_resumers_then_takeover_fences_the_first(tmp_path, reference):
    from instrumented_adam.telemetry.store import RunStore

    db = tmp_path / "requeue.sqlite"
    first_job = _spawn(db=str(db), ckpt_dir=str(tmp_path))
    _read_until(first_job, "EPOCH 0")
    first_job.send_signal(signal.SIGKILL)  # the node died: the job is requeued
    first_job.wait(timeout=30)
    checkpoint = _latest_checkpoint(tmp_path)

    go = tmp_path / "go"
    old = _spawn(db=str(db), ckpt_dir=str(tmp_path), resume=str(checkpoint), wait_for=str(go))
    try:
        _read_until(old, "RESUMED")
        # The requeued copy starts while the old one still runs: refused, naming the holder.
        second = _spawn(db=str(db), ckpt_dir=str(tmp_path), resume=str(checkpoint))
        out, err = second.communicate(timeout=120)
        assert second.returncode != 0
        assert re.search(rf"RunLeaseError: run 1 \('run'\) .* held by writer [0-9a-f]{{32}} \(host .*, pid {old.pid}\)", err), err[-2000:]
        assert "takeover=True" in err
        before = _frames(db)["steps"]
        # The old job hangs (no heartbeat for longer than its lease): its lease expires.
        with RunStore(db) as store:
            store.conn.execute("UPDATE leases SET heartbeat = heartbeat - 100000")
        with pytest.raises(Exception, match="expired"):
            RunStore(db).acquire_lease("run")
        takeover = _spawn(db=str(db), ckpt_dir=str(tmp_path), resume=str(checkpoint), takeover=True)
        out, err = takeover.communicate(timeout=120)
        assert takeover.returncode == 0, err[-2000:]
        assert len(before) <= len(_frames(db)["steps"])
        after_takeover = _frames(db)
        go.touch()  # the old job wakes up and writes: fenced out
        out, err = old.communicate(timeout=120)
        assert old.returncode != 0 and "LeaseLostError" in err, err[-2000:]
    finally:
        old.kill()
        old.wait(timeout=30)
    got = _frames(db)
    for table, expected in reference.items():
        pd.testing.assert_frame_equal(got[table], after_takeover[table], check_exact=True, obj=f"fenced writer wrote {table}")
        pd.testing.assert_frame_equal(got[table], expected, check_exact=True, obj=table)
    with RunStore(db, readonly=True) as store:
        assert store.run_info("run")["status"] == "finished"


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "train":
    train(**json.loads(sys.argv[2]))
