"""The run store: what it refuses to open, schema versions, and readers while training writes.

Run as a script (`python test_store.py reader <db> <stop-file> <report>`), it is the reader process
of `test_a_reader_process_polls_while_training_writes`.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instrumented_adam.telemetry.store import (
    SCHEMA_VERSION,
    NotAStoreError,
    RunStore,
    SchemaVersionError,
    StoreError,
    UnknownRunError,
    wait_for_store,
)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_text_file_is_refused_untouched(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_text("these are my notes, not a database\n" * 50)
    before = _files(tmp_path)
    for kwargs in ({}, {"create": True}, {"readonly": True}):
        with pytest.raises(NotAStoreError, match="not an SQLite database"):
            RunStore(path, **kwargs)
    assert _files(tmp_path) == before  # no journal, no WAL, same bytes


def test_another_sqlite_database_is_refused_untouched(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO customers(name) VALUES ('ada')")
    conn.commit()
    conn.close()
    before = _files(tmp_path)
    with pytest.raises(NotAStoreError, match="not an instrumented_adam run store.*customers"):
        RunStore(path, create=True)
    from instrumented_adam.telemetry.recorder import Recorder
    import instrumented_adam as ia
    import torch

    opt = ia.Adam(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(NotAStoreError):
        Recorder(opt, path, run_name="x")
    assert _files(tmp_path) == before


def test_a_store_from_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.sqlite"
    RunStore(path, create=True).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade"):
        RunStore(path)
    assert path.read_bytes() == before


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run store"):
        RunStore(tmp_path / "missing.sqlite")
    assert not (tmp_path / "missing.sqlite").exists()
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    with pytest.raises(NotAStoreError, match="empty"):
        RunStore(empty)
    with RunStore(empty, create=True) as store:  # an empty file holds nothing to lose
        assert store.runs().empty
    with pytest.raises(NotAStoreError, match="directory"):
        RunStore(tmp_path)


def test_runs_and_unknown_runs(tmp_path):
    with RunStore(tmp_path / "r.sqlite", create=True) as store:
        a = store.create_run("base", hyperparameters={"lr": 1e-3, "betas": (0.9, 0.99)}, seed=1)
        b = store.create_run("base")  # a name may repeat: it then means the latest run
        c = store.create_run("branch", parent_run="base", branch_epoch=4)
        assert (a, b, c) == (1, 2, 3)
        assert store.run_id("base") == 2 and store.run_id(1) == 1 and store.run_id("3") == 3
        with pytest.raises(UnknownRunError, match="no run 'nope'.*1:base, 2:base, 3:branch"):
            store.run_id("nope")
        with pytest.raises(UnknownRunError):
            store.steps(42)
        with pytest.raises(StoreError, match="branch_epoch given without a parent_run"):
            store.create_run("x", branch_epoch=3)
        runs = store.runs()
        assert list(runs.columns[:9]) == [
            "run_id", "name", "started_at", "status", "seed", "code_version", "parent_run", "branch_epoch", "hyperparameters"
        ]
        assert runs["hyperparameters"][0] == {"lr": 1e-3, "betas": [0.9, 0.99]}
        assert runs["parent_run"].tolist()[2] == 2 and runs["branch_epoch"].tolist()[2] == 4
        assert store.lineage("branch") == [2, 3]
        assert store.integrity_check() == "ok"
        with pytest.raises(StoreError, match="has branches"):
            store.delete_run(2)
        store.delete_run(3)
        assert store.runs()["run_id"].tolist() == [1, 2]


def test_readonly_open_of_a_closed_store(tmp_path):
    path = tmp_path / "ro.sqlite"
    with RunStore(path, create=True) as store:
        store.create_run("a")
    with RunStore(path, readonly=True) as ro:
        assert ro.runs()["name"].tolist() == ["a"]
        with pytest.raises(StoreError, match="read-only"):
            ro.create_run("b")


def _reader(db: str, stop: str, report: str) -> None:
    """Polls every loader until `stop` exists; counts polls (in `report`.progress) and errors."""
    store = wait_for_store(db, readonly=True)
    polls, errors, last = 0, [], 0
    progress = Path(report + ".progress")
    while not Path(stop).exists():
        try:
            runs = store.runs()
            for run in runs["run_id"]:
                steps = store.steps(run)
                epochs = store.epochs(run)
                store.layers(run)
                store.metrics(run)
                store.step_groups(run)
                if len(steps):
                    # rows only ever grow, in order, without gaps
                    assert steps["step"].tolist() == list(range(1, len(steps) + 1)), "gap or disorder"
                    assert len(steps) >= last, "rows disappeared"
                    last = len(steps)
                if len(epochs) and "val_loss" not in epochs.columns:
                    raise AssertionError("an epoch row without its metrics")
            polls += 1
            progress.write_text(str(polls))
        except Exception as e:  # noqa: BLE001 - any error is the test's failure
            errors.append(f"{type(e).__name__}: {e}")
    Path(report).write_text(json.dumps({"polls": polls, "errors": errors[:5], "last": last}))


def test_a_reader_process_polls_while_training_writes(tmp_path):
    import torch

    import instrumented_adam as ia
    from instrumented_adam.telemetry.recorder import Recorder

    db, stop, report = tmp_path / "live.sqlite", tmp_path / "stop", tmp_path / "report.json"
    progress = Path(str(report) + ".progress")
    reader = subprocess.Popen([sys.executable, __file__, "reader", str(db), str(stop), str(report)])
    polls_during_training = 0
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        opt = ia.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 1e-2}])
        rec = Recorder(opt, db, run_name="live", model=model, flush_every=2)
        deadline = time.monotonic() + 90
        start_polls = None
        # Train until the reader has polled many times while rows were being written.
        while time.monotonic() < deadline and reader.poll() is None:
            for _ in range(10):
                loss = model(torch.randn(16, 8)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            rec.end_epoch(val_loss=loss.item())
            try:
                polls = int(progress.read_text())
            except (FileNotFoundError, ValueError):
                continue
            start_polls = polls if start_polls is None else start_polls
            polls_during_training = polls - start_polls
            if polls_during_training >= 10:
                break
        rec.close()
    finally:
        stop.touch()
        reader.wait(timeout=60)
    result = json.loads(report.read_text())
    assert reader.returncode == 0
    assert result["errors"] == []
    assert polls_during_training >= 10 and result["last"] > 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "reader":
    _reader(*sys.argv[2:5])


# ---- schema 2: run leases, durability, positions, hyperparameters, files (issues 10 and 8) ------
import os
import shutil
import signal
import socket

import pandas as pd

from instrumented_adam.telemetry.store import (
    HYPER_COLUMNS,
    CorruptStoreError,
    MetricClashError,
    HotJournalError,
    LeaseLostError,
    ReadOnlyStoreError,
    RunLeaseError,
    StoreGapError,
)

V1_FIXTURE = Path(__file__).parent / "data" / "store_v1.sqlite"
_STEP_COLUMNS = ("step", "epoch", "lr", "update_norm")


def _steps(store: RunStore, run: int, steps: range) -> None:
    store.write_steps(run, _STEP_COLUMNS, [(s, 0, 1e-3, 0.1 * s) for s in steps])


def _count(path: Path, table: str = "steps") -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def test_a_second_writer_gets_an_error_naming_the_holder(tmp_path):
    """Issue 10 item 1. Reproduction on the landed code: a requeued job resuming a run another job
    still writes truncated that job's rows, then died of a raw IntegrityError inside opt.step(),
    and the first job finished into a run mixing both jobs' rows."""
    path = tmp_path / "lease.sqlite"
    first = RunStore(path, create=True)
    run = first.create_run("r")  # create_run takes the lease
    _steps(first, run, range(1, 6))
    second = RunStore(path)
    for write in (
        lambda: second.truncate_run(run, step=2, epoch=0),
        lambda: _steps(second, run, range(6, 8)),
        lambda: second.acquire_lease(run),
        lambda: second.acquire_lease(run, takeover=True),  # not expired: takeover is refused too
    ):
        with pytest.raises(RunLeaseError, match=rf"held by writer [0-9a-f]{{32}} \(host {socket.gethostname()}, pid {os.getpid()}.*last heartbeat.*takeover=True"):
            write()
    assert second.steps(run)["step"].tolist() == [1, 2, 3, 4, 5]  # nothing truncated, nothing added
    lease = second.lease(run)
    assert lease["pid"] == os.getpid() and not lease["expired"]
    first.release_lease(run)
    first.release_lease(run)  # idempotent
    second.acquire_lease(run)
    _steps(second, run, range(6, 7))
    with pytest.raises(RunLeaseError, match="held by writer"):  # released: it is the other's now
        _steps(first, run, range(7, 8))
    first.close()
    second.close()
    assert RunStore(path).lease(run) is None  # close released it


def test_takeover_after_expiry_fences_the_old_writer_out(tmp_path):
    path = tmp_path / "fence.sqlite"
    old = RunStore(path, create=True)
    run = old.create_run("r", expire_after=0.2)
    _steps(old, run, range(1, 4))
    # the holder looks like a job on another node: its liveness cannot be judged from here
    old.conn.execute("UPDATE leases SET host='node-17'")
    new = RunStore(path)
    with pytest.raises(RunLeaseError, match="node-17"):
        new.acquire_lease(run)
    time.sleep(0.3)
    with pytest.raises(RunLeaseError, match="expired.*takeover=True"):
        new.acquire_lease(run)
    writer = new.acquire_lease(run, takeover=True)
    assert new.lease(run)["writer"] == writer
    before = {t: _count(path, t) for t in ("steps", "epochs", "metrics", "checkpoints")}
    fenced = (
        lambda: _steps(old, run, range(4, 6)),
        lambda: old.write_epoch(run, {"epoch": 0, "step": 3, "num_steps": 3, "recorded_steps": 3}, metrics={"loss": 1.0}),
        lambda: old.write_metrics(run, 0, {"late": 1.0}),
        lambda: old.record_checkpoint(run, 3, 1, tmp_path / "c.pt"),
        lambda: old.truncate_run(run, step=0, epoch=0),
        lambda: old.set_status(run, "finished"),
    )
    for write in fenced:
        with pytest.raises(LeaseLostError, match=f"held by writer {writer}"):
            write()
    assert {t: _count(path, t) for t in before} == before  # the fenced writer wrote nothing
    assert new.runs()["status"].tolist() == ["running"]
    _steps(new, run, range(4, 5))
    assert new.steps(run)["step"].tolist() == [1, 2, 3, 4]


def test_the_lease_of_a_killed_writer_on_this_host_is_free(tmp_path):
    """A job killed with SIGKILL leaves its lease behind; a resume on the same host takes it
    without takeover (its process is gone), as kill-and-resume always did."""
    path = tmp_path / "killed.sqlite"
    code = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[2]);"
        "from instrumented_adam.telemetry.store import RunStore;"
        "s = RunStore(sys.argv[1], create=True); r = s.create_run('k');"
        "s.write_steps(r, ('step', 'epoch'), [(1, 0)]); os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(Path(__file__).parent.parent)])
    assert proc.returncode == -signal.SIGKILL
    with RunStore(path) as store:
        assert store.lease("k")["pid"] not in (None, os.getpid())  # left behind by the killed job
        store.truncate_run(store.run_id("k"), step=0, epoch=0)  # takes the free lease
        assert store.lease("k")["pid"] == os.getpid()


def test_sync_makes_the_database_file_alone_hold_every_commit(tmp_path):
    """Issue 10 item 2: under synchronous=NORMAL the last commits live only in the -wal until a
    checkpoint; a power cut (or a copy of the .sqlite file alone) loses them. After sync() the
    database file holds them."""
    path = tmp_path / "durable.sqlite"
    store = RunStore(path, create=True)
    run = store.create_run("d")
    _steps(store, run, range(1, 51))
    shutil.copy(path, tmp_path / "before.sqlite")
    counters = store.sync()
    assert counters["busy"] == 0 and counters["checkpointed_frames"] == counters["wal_frames"]
    shutil.copy(path, tmp_path / "after.sqlite")  # the database file only, no -wal
    assert _count(tmp_path / "after.sqlite") == 50
    assert _count(tmp_path / "before.sqlite") < 50
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # back to NORMAL
    store.close()


def test_verify_position_refuses_a_store_that_lacks_rows_the_checkpoint_expects(tmp_path):
    """Issue 10 item 2. Reproduction on the landed code: resuming against an older copy of the
    store (or one that lost its last transactions) was accepted and left a permanent gap."""
    path = tmp_path / "pos.sqlite"
    store = RunStore(path, create=True)
    run = store.create_run("p")
    _steps(store, run, range(1, 5))
    store.write_epoch(run, {"epoch": 0, "step": 4, "num_steps": 4, "recorded_steps": 4}, metrics={"val_loss": 1.0})
    store.sync()
    shutil.copy(path, tmp_path / "old-copy.sqlite")
    _steps(store, run, range(5, 9))
    store.write_epoch(run, {"epoch": 1, "step": 8, "num_steps": 4, "recorded_steps": 4}, metrics={"val_loss": 0.5})
    position = store.position(run)
    assert json.loads(json.dumps(position)) == position  # JSON-able, as a checkpoint stores it
    assert position["last_step"] == 8 and position["last_epoch"] == 1
    assert position["rows"] == {"steps": 8, "step_groups": 0, "epochs": 2, "layer_epochs": 0, "metrics": 2}
    store.verify_position(run, position)
    _steps(store, run, range(9, 11))  # rows beyond the position (a resume deletes them) do not matter
    store.verify_position(run, position)
    store.close()
    with RunStore(tmp_path / "old-copy.sqlite") as old:
        with pytest.raises(StoreGapError, match=r"lacks 4 steps rows, 1 epochs rows, 1 metrics rows.*expects steps up to 8.*holds steps up to 4.*allow_gap=True"):
            old.verify_position(run, position)
        with pytest.raises(StoreGapError, match="--accept-gap"):
            old.verify_position(run, position, option="--accept-gap")
        assert old.gaps(run).empty
        old.mark_gap(run, from_step=5, to_step=8, from_epoch=1, to_epoch=1, reason="store older than the checkpoint")
        gaps = old.gaps(run)
        assert gaps[["from_step", "to_step", "from_epoch", "to_epoch"]].values.tolist() == [[5, 8, 1, 1]]
        assert gaps["reason"].tolist() == ["store older than the checkpoint"]
        old.truncate_run(run, step=2, epoch=0)  # a resume before the gap re-records it: the mark goes
        assert old.gaps(run).empty


def test_a_changed_row_set_is_a_gap_even_with_equal_counts(tmp_path):
    store = RunStore(tmp_path / "same.sqlite", create=True)
    run = store.create_run("s")
    _steps(store, run, range(1, 4))
    position = store.position(run)
    store.truncate_run(run, step=1, epoch=0)
    _steps(store, run, range(3, 5))  # 3 rows again, but steps 1, 3, 4 where the checkpoint saw 1, 2, 3
    with pytest.raises(StoreGapError, match="lacks"):
        store.verify_position(run, position)


def test_hyperparameter_columns_are_not_adams_alone(tmp_path):
    """Issue 8: the landed schema had Adam's five columns only; an SGD run's momentum and
    dampening had nowhere to go (write_steps raised 'no column named momentum')."""
    with RunStore(tmp_path / "h.sqlite", create=True) as store:
        sgd = store.create_run("sgd", optimizer="SGD")
        store.write_steps(sgd, ("step", "epoch", "lr", "momentum", "dampening", "nesterov", "update_norm"),
                          [(1, 0, 0.1, 0.9, 0.0, 1, 0.5), (2, 0, 0.1, 0.9, 0.0, 1, 0.4)])
        adam = store.create_run("adam", hyperparameter_columns=("lr", "weight_decay", "beta1", "beta2", "eps"))
        store.write_steps(adam, ("step", "epoch", "lr", "weight_decay", "beta1", "beta2", "eps", "update_norm"),
                          [(1, 0, 1e-3, 0.0, 0.9, 0.999, 1e-8, 0.01)])
        rms = store.create_run("rms")
        store.write_epoch(rms, {"epoch": 0, "step": 3, "num_steps": 3, "recorded_steps": 3, "lr": 1e-2, "alpha": 0.99,
                                "centered": 0, "skipped_steps": 1}, hyperparameters=("lr", "alpha", "centered"))
        assert store.hyperparameter_columns("sgd") == ("lr", "momentum", "dampening", "nesterov")
        assert store.hyperparameter_columns("adam") == ("lr", "weight_decay", "beta1", "beta2", "eps")
        assert store.hyperparameter_columns("rms") == ("lr", "alpha", "centered")
        steps = store.steps("sgd")
        assert list(steps.columns[:8]) == ["run_id", "step", "epoch", "lr", "weight_decay", "beta1", "beta2", "eps"]
        assert steps["momentum"].tolist() == [0.9, 0.9] and steps["beta1"].isna().all()
        assert store.step_groups("sgd")["momentum"].tolist() == [0.9, 0.9]
        assert store.epochs("rms")["skipped_steps"].tolist() == [1]
        assert store.runs().set_index("name").loc["sgd", "hyperparameter_columns"] == ["lr", "momentum", "dampening", "nesterov"]


def test_skipped_steps_and_divergence_are_recorded(tmp_path):
    with RunStore(tmp_path / "skip.sqlite", create=True) as store:
        run = store.create_run("amp")
        store.write_steps(run, ("step", "epoch", "lr", "skipped", "grad_scale", "nonfinite_grads"),
                          [(1, 0, 1e-3, 0, 65536.0, 0), (2, 0, 1e-3, 1, 65536.0, 12), (3, 0, 1e-3, 0, 32768.0, 0)])
        steps = store.steps(run)
        assert steps["skipped"].tolist() == [0, 1, 0] and steps["grad_scale"].tolist() == [65536.0, 65536.0, 32768.0]
        store.set_status(run, "diverged", detail="step 7 (epoch 0): loss and 3 gradients non-finite")
        info = store.run_info(run)
        assert info["status"] == "diverged" and info["status_detail"].startswith("step 7")
        assert info["finished_at"] is not None
        store.set_status(run, "finished")
        assert store.run_info(run)["status_detail"] is None


def _frames_v1(store: RunStore) -> dict[str, pd.DataFrame]:
    return {t: getattr(store, t)() for t in ("steps", "step_groups", "epochs", "layers", "metrics", "checkpoints")}


def test_a_version_1_store_reads_the_same_and_migrates_on_the_first_write(tmp_path):
    """Issue 8: a store written by the landed code (schema 1: tests/data/store_v1.sqlite, built
    by tests/data/make_store_v1.py from the landed store code) opens and reads the same with
    this code; a read never migrates it; the first write does, in one transaction."""
    path = tmp_path / "v1.sqlite"
    shutil.copy(V1_FIXTURE, path)
    original = path.read_bytes()
    with RunStore(path, readonly=True) as ro:
        assert ro.schema_version == 1
        before = _frames_v1(ro)
        runs_before = ro.runs()
        assert ro.hyperparameter_columns("base") == HYPER_COLUMNS and ro.gaps().empty and ro.lease("base") is None
    with RunStore(path) as reader:  # a writable open that only reads does not migrate either
        assert reader.schema_version == 1 and reader.steps("base")["step"].tolist() == list(range(1, 13))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()
    steps = before["steps"][before["steps"]["run_id"] == 1]
    assert steps["update_norm"].tolist() == pytest.approx([0.1 / s for s in range(1, 13)], rel=1e-15)
    assert list(steps.columns[:8]) == ["run_id", "step", "epoch", *["lr", "weight_decay", "beta1", "beta2", "eps"]][:8]
    assert len(before["step_groups"]) == 24 + 1 and before["epochs"]["cos_prev"].isna().tolist() == [True, False, False]
    assert before["epochs"]["val_loss"].tolist() == pytest.approx([1.5, 0.75, 0.5])
    assert runs_before["status"].tolist() == ["finished", "failed"] and runs_before["status_detail"].isna().all()
    assert runs_before["hyperparameters"][0] == {"lr": 1e-3, "betas": [0.9, 0.999]}

    with RunStore(path) as store:
        store.set_status("branch", "diverged", detail="step 9: non-finite update")  # the first write
        assert store.schema_version == 2
        after = _frames_v1(store)
        for table, frame in before.items():  # every old column reads the same; new ones are NULL
            pd.testing.assert_frame_equal(after[table][list(frame.columns)], frame, check_exact=True, obj=table)
        assert after["steps"]["skipped"].isna().all() and after["epochs"]["skipped_steps"].isna().all()
        assert store.hyperparameter_columns("base") == HYPER_COLUMNS
        assert store.run_info("branch")["status"] == "diverged"
        assert store.integrity_check() == "ok"
        run = store.acquire_lease("base")
        assert isinstance(run, str)
        store.write_steps(1, ("step", "epoch", "lr", "momentum"), [(13, 3, 1e-3, 0.5)])
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()
    assert V1_FIXTURE.read_bytes() != path.read_bytes() and original == V1_FIXTURE.read_bytes()


def _tmpfs(path: Path, size: str = "8m") -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def mount_point(tmp_path):
    """A small tmpfs that the test may remount read-only (needs mount rights: root in a container)."""
    point = tmp_path / "mnt"
    if not _tmpfs(point):
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield point
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_store_in_a_read_only_directory_opens_readonly(mount_point):
    """Issue 10 item 6. Reproduction on the landed code: RunStore(path, readonly=True) in a
    read-only directory failed ('unable to open database file': WAL needs its -shm)."""
    path = mount_point / "archive.sqlite"
    with RunStore(path, create=True) as store:
        run = store.create_run("a")
        _steps(store, run, range(1, 4))
    assert subprocess.run(["mount", "-o", "remount,ro", str(mount_point)]).returncode == 0
    with RunStore(path, readonly=True) as ro:
        assert ro.immutable and ro.steps("a")["step"].tolist() == [1, 2, 3]
    with pytest.raises(ReadOnlyStoreError, match="read-only directory.*readonly=True"):
        RunStore(path)


def test_truncated_store_and_hot_journal_get_their_own_messages(tmp_path):
    """Issue 10 item 6: on the landed code a truncated store, a hot journal and a read-only
    directory all failed with one message (or a raw sqlite3 error)."""
    path = tmp_path / "t.sqlite"
    with RunStore(path, create=True) as store:
        _steps(store, store.create_run("t"), range(1, 400))
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    for kwargs in ({}, {"readonly": True}):
        with pytest.raises(CorruptStoreError, match=rf"truncated: its header says \d+ pages of 4096 bytes .*the file has {size // 2}"):
            RunStore(path, **kwargs).steps("t")
    with open(path, "r+b") as f:
        f.truncate(60)
    with pytest.raises(CorruptStoreError, match="truncated: 60 bytes"):
        RunStore(path)

    hot = tmp_path / "hot.sqlite"
    with RunStore(hot, create=True) as store:
        store.create_run("h")
    code = (  # a rollback-journal writer killed mid-transaction, after it spilled pages to the file
        "import os, sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None);"
        "c.execute('PRAGMA journal_mode=DELETE'); c.execute('PRAGMA cache_size=1'); c.execute('BEGIN');"
        "c.execute('CREATE TABLE filler(x)');"
        "c.execute('INSERT INTO filler SELECT randomblob(3000) FROM (WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<300) SELECT i FROM n)');"
        "os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code, str(hot)], check=True)
    assert Path(f"{hot}-journal").exists()
    with pytest.raises(HotJournalError, match="hot journal.*readonly=False"):
        RunStore(hot, readonly=True)
    with RunStore(hot) as store:  # a writable open rolls the interrupted transaction back
        assert store.runs()["name"].tolist() == ["h"] and "filler" not in [
            r[0] for r in store.conn.execute("SELECT name FROM sqlite_master")]


def test_a_late_metric_logged_after_a_checkpoint_does_not_block_it_after_resume(tmp_path):
    """Issue 10 item 6 (H3's request). Reproduction on the landed code: end_epoch, checkpoint, a
    late validation metric for that epoch, a crash; the resume truncated only epochs >= E, so
    logging the same late metric again raised MetricClashError."""
    with RunStore(tmp_path / "late.sqlite", create=True) as store:
        run = store.create_run("late")
        _steps(store, run, range(1, 5))
        store.write_epoch(run, {"epoch": 0, "step": 4, "num_steps": 4, "recorded_steps": 4}, metrics={"val_loss": 1.0})
        store.write_metrics(run, 0, {"early_test": 0.5}, step=4)  # before the checkpoint: kept
        position = store.position(run)  # the checkpoint at step 4, one epoch done
        store.write_metrics(run, 0, {"test_acc": 0.9}, step=4)  # after it, at the same step
        _steps(store, run, range(5, 7))
        store.write_metrics(run, 0, {"late_acc": 0.8}, step=6)  # after it, steps later
        with pytest.raises(MetricClashError):
            store.write_metrics(run, 0, {"test_acc": 0.9}, step=4)
        deleted = store.truncate_run(run, step=4, epoch=1, position=position)
        assert deleted["metrics"] == 2 and deleted["steps"] == 2
        assert sorted(store.metrics(run)["name"]) == ["early_test", "val_loss"]
        store.write_metrics(run, 0, {"test_acc": 0.9}, step=4)  # the resumed run logs it again
        store.write_metrics(run, 0, {"late_acc": 0.8}, step=6)
        assert list(store.metrics(run).columns) == ["run_id", "epoch", "name", "value"]
        store.truncate_run(run, step=5, epoch=1)  # without a position: metrics of steps beyond go
        assert "late_acc" not in set(store.metrics(run)["name"])
