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
