"""The run store: one SQLite file per experiment holding every run's telemetry.

    store = RunStore("runs/exp.sqlite")          # open an existing store (readers)
    store.runs()                                 # one row per run, with lineage
    store.steps("baseline"), store.epochs(3)     # pandas DataFrames

Why SQLite: it is in the standard library, one file is one experiment (easy to copy, archive and
attach to a paper), and in WAL mode a report can read while training writes. A write commits
atomically, so a ``kill -9`` loses at most the rows not yet handed to the store and never leaves a
half-written file behind (``synchronous=NORMAL`` in WAL mode is durable against process crashes;
only a power cut can lose the last commits).

Schema (version `SCHEMA_VERSION`, kept in ``PRAGMA user_version``; our files carry
``PRAGMA application_id`` = `APPLICATION_ID` so that a foreign database is recognised and left
untouched):

    meta(key, value)                               format marker, creation time, package version
    runs(run_id, name, started_at, updated_at, finished_at, status, seed, code_version,
         package_version, optimizer, hyperparameters JSON, optimizer_config JSON,
         parent_run, branch_epoch, branch_step, num_groups)
    steps(run_id, step, epoch, lr, weight_decay, beta1, beta2, eps, <step figures>)
        overall figures per recorded step; the hyperparameters are those of param group 0
    step_groups(run_id, step, grp, lr, weight_decay, beta1, beta2, eps, <step figures>)
        per-group figures; written only when the optimizer has more than one param group
        (`RunStore.step_groups` presents the steps table as group 0 otherwise)
    epochs(run_id, epoch, step, num_steps, recorded_steps, wall_time, lr, weight_decay, beta1,
           beta2, eps, <epoch geometry>, <f_mean, f_min, f_max for each step figure f>)
    layer_epochs(run_id, epoch, layer_index, layer, grp, numel, <epoch geometry per tensor>,
                 <the epoch's last step's figures per tensor>)
    metrics(run_id, epoch, name, value)           user metrics, long form
    checkpoints(run_id, step, epochs_done, path, saved_at)

The figure columns are added (``ALTER TABLE ADD COLUMN``) from the names the statistics code
derives, so a figure added to `instrumented_adam.stats` needs no schema migration. SQLite stores
NaN as NULL: loaders turn it back into NaN.

This module does not import torch: a report or a dashboard reads the store with pandas alone.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import pandas as pd

#: ``PRAGMA application_id`` of our files ("IADS": instrumented_adam store).
APPLICATION_ID = 0x49414453
#: ``PRAGMA user_version`` written by this code; newer files are refused, not guessed at.
SCHEMA_VERSION = 1
FORMAT_MARKER = "instrumented_adam.runstore"

#: The hyperparameters recorded beside every step and epoch row (param group 0 in `steps`).
HYPER_COLUMNS: tuple[str, ...] = ("lr", "weight_decay", "beta1", "beta2", "eps")

RUN_STATUSES = ("running", "finished", "failed")

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    run_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    started_at TEXT NOT NULL,
    updated_at TEXT,
    finished_at TEXT,
    status TEXT NOT NULL CHECK (status IN {RUN_STATUSES!r}),
    seed INTEGER,
    code_version TEXT,
    package_version TEXT,
    optimizer TEXT,
    hyperparameters TEXT NOT NULL DEFAULT '{{}}',
    optimizer_config TEXT NOT NULL DEFAULT '[]',
    parent_run INTEGER REFERENCES runs(run_id),
    branch_epoch INTEGER,
    branch_step INTEGER,
    num_groups INTEGER
);
CREATE INDEX runs_name ON runs(name);
CREATE TABLE steps (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    step INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    lr REAL, weight_decay REAL, beta1 REAL, beta2 REAL, eps REAL,
    PRIMARY KEY (run_id, step)
) WITHOUT ROWID;
CREATE TABLE step_groups (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    step INTEGER NOT NULL,
    grp INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    lr REAL, weight_decay REAL, beta1 REAL, beta2 REAL, eps REAL,
    PRIMARY KEY (run_id, step, grp)
) WITHOUT ROWID;
CREATE TABLE epochs (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    epoch INTEGER NOT NULL,
    step INTEGER NOT NULL,
    num_steps INTEGER NOT NULL,
    recorded_steps INTEGER NOT NULL,
    wall_time REAL,
    lr REAL, weight_decay REAL, beta1 REAL, beta2 REAL, eps REAL,
    PRIMARY KEY (run_id, epoch)
) WITHOUT ROWID;
CREATE TABLE layer_epochs (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    epoch INTEGER NOT NULL,
    layer_index INTEGER NOT NULL,
    layer TEXT NOT NULL,
    grp INTEGER NOT NULL,
    numel INTEGER NOT NULL,
    PRIMARY KEY (run_id, epoch, layer_index)
) WITHOUT ROWID;
CREATE TABLE metrics (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    epoch INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, epoch, name)
) WITHOUT ROWID;
CREATE TABLE checkpoints (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    step INTEGER NOT NULL,
    epochs_done INTEGER NOT NULL,
    path TEXT NOT NULL,
    saved_at TEXT NOT NULL,
    PRIMARY KEY (run_id, step, path)
) WITHOUT ROWID;
"""

# Tables holding rows of a run, and the position column that orders them (for truncation).
_RUN_TABLES: dict[str, str] = {
    "steps": "step",
    "step_groups": "step",
    "epochs": "epoch",
    "layer_epochs": "epoch",
    "metrics": "epoch",
    "checkpoints": "step",
}


class StoreError(ValueError):
    """A store cannot be opened or used as asked (the message says why)."""


class NotAStoreError(StoreError):
    """The file is not an instrumented_adam run store (not SQLite, or someone else's database)."""


class SchemaVersionError(StoreError):
    """The store was written by a newer instrumented_adam than the one reading it."""


class UnknownRunError(StoreError, KeyError):
    """No run with that name or id in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MetricClashError(StoreError):
    """A metric is logged twice for one epoch, or named like a built-in column."""


def utc_now() -> str:
    """The current time as ISO 8601 UTC with microseconds (sorts as text)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _quote(name: str) -> str:
    """A column name as an SQL identifier; names come from our code, never from users."""
    if not _IDENTIFIER.match(name):
        raise StoreError(f"invalid column name {name!r}")
    return f'"{name}"'


def _clean(value: Any) -> Any:
    """A value SQLite can bind: floats stay floats (NaN is stored as NULL by SQLite itself)."""
    if isinstance(value, bool):
        return int(value)
    return value


def to_jsonable(value: Any) -> Any:
    """Hyperparameters as JSON values: tuples become lists, 0-d tensors/arrays numbers, the rest str."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    item = getattr(value, "item", None)  # torch / numpy scalars, without importing either
    numel = getattr(value, "numel", None)
    size = getattr(value, "size", None)
    if callable(item) and ((callable(numel) and numel() == 1) or size == 1):
        return to_jsonable(item())
    return str(value)


class RunStore:
    """One experiment's SQLite store of runs: the recorder writes it, loaders read it.

    Args:
        path: the database file.
        create: create and initialise the file when it does not exist (or is empty). Readers
            leave it False, so that a typo in a path is an error rather than a new empty store.
        readonly: open with ``mode=ro`` (a reader that must not write, e.g. on a shared volume).
        timeout: seconds to wait for another process's write lock before failing.

    Raises:
        FileNotFoundError: no file at `path` and `create` is False.
        NotAStoreError: the file is not SQLite, or is an SQLite database of something else.
        SchemaVersionError: the store was written by a newer version of this package.

    A store object may be shared between threads (calls are serialised by a lock); open one per
    process. Loaders accept a run as its id or its name (the latest run of that name).
    """

    def __init__(self, path: str | Path, *, create: bool = False, readonly: bool = False, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        if not self.path.exists():
            if not create or readonly:
                raise FileNotFoundError(f"no run store at {self.path} (pass create=True to make one)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif self.path.is_dir():
            raise NotAStoreError(f"{self.path} is a directory, not a run store")
        if readonly:
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        self._conn: sqlite3.Connection | None = conn
        try:
            self._open(create and not readonly)
        except BaseException:
            conn.close()
            self._conn = None
            raise

    # ---- opening ----------------------------------------------------------------------------
    def _identify(self) -> tuple[int, int, list[str]]:
        """application_id, user_version and table names, read without writing anything."""
        try:
            app_id = self.conn.execute("PRAGMA application_id").fetchone()[0]
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            tables = [r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        except sqlite3.DatabaseError as e:
            raise NotAStoreError(f"{self.path} is not an instrumented_adam run store: not an SQLite database ({e})") from e
        return app_id, version, tables

    def _open(self, create: bool) -> None:
        app_id, version, tables = self._identify()
        if app_id != APPLICATION_ID:
            if app_id == 0 and version == 0 and not tables:
                if not create:
                    raise NotAStoreError(f"{self.path} is an empty SQLite file, not an initialised run store")
                self._initialise()
            else:
                shown = ", ".join(sorted(tables)[:8]) or "none"
                raise NotAStoreError(
                    f"{self.path} is an SQLite database but not an instrumented_adam run store "
                    f"(application_id={app_id:#x}, tables: {shown}); refusing to touch it"
                )
        else:
            self._check_version(version)
        if not self.readonly:
            # Only now, with the file known to be ours: switching to WAL writes to the header.
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=ON")

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path} has schema version {version}, newer than the {SCHEMA_VERSION} this "
                "instrumented_adam understands: upgrade instrumented_adam to read it"
            )
        if version < 1:
            raise NotAStoreError(f"{self.path} carries our application id but no schema (version {version})")

    def _initialise(self) -> None:
        with self._write():
            # Re-check inside the write lock: another process may have initialised it meanwhile.
            app_id, version, tables = self._identify()
            if app_id == APPLICATION_ID:
                self._check_version(version)
                return
            if tables:
                raise NotAStoreError(f"{self.path} gained tables while being initialised; not a run store")
            # Statement by statement: executescript() would COMMIT our open transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            from .. import __version__ as package_version  # noqa: PLC0415 (avoid a cycle at import)

            self.conn.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?)",
                [("format", FORMAT_MARKER), ("created_at", utc_now()), ("created_by", f"instrumented_adam {package_version}")],
            )
            self.conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # ---- plumbing ---------------------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        """The open connection (raises after `close`)."""
        if self._conn is None:
            raise StoreError(f"the run store {self.path} is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it commits, or none of it."""
        if self.readonly:
            raise StoreError(f"the run store {self.path} was opened read-only")
        with self._lock:
            conn = self.conn
            # IMMEDIATE takes the write lock up front: no deadlock when two writers upgrade.
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: several queries see one consistent state while a writer commits."""
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def close(self) -> None:
        """Closes the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    def columns(self, table: str) -> list[str]:
        """The column names of one of the store's tables, in order."""
        if table not in _RUN_TABLES and table not in ("runs", "meta"):
            raise StoreError(f"unknown table {table!r}")
        with self._lock:
            return [r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")]

    def _real_columns(self, table: str) -> list[str]:
        with self._lock:
            return [r[1] for r in self.conn.execute(f"PRAGMA table_info({table})") if r[2].upper() == "REAL"]

    # ---- writing (used by the Recorder) -----------------------------------------------------
    def ensure_columns(self, table: str, names: Iterable[str]) -> None:
        """Adds REAL columns `names` to `table` where missing (figures new to this store)."""
        existing = set(self.columns(table))
        missing = [n for n in names if n not in existing]
        if not missing:
            return
        with self._write() as conn:
            existing = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}  # re-read under the lock
            for name in missing:
                if name not in existing:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {_quote(name)} REAL")

    def create_run(
        self,
        name: str,
        *,
        hyperparameters: Mapping[str, Any] | None = None,
        seed: int | None = None,
        code_version: str | None = None,
        package_version: str | None = None,
        optimizer: str | None = None,
        optimizer_config: Any = None,
        parent_run: int | str | None = None,
        branch_epoch: int | None = None,
        branch_step: int | None = None,
        num_groups: int | None = None,
    ) -> int:
        """Adds a run (status 'running') and returns its id."""
        if not isinstance(name, str) or not name:
            raise StoreError(f"a run name must be a non-empty string, got {name!r}")
        parent = self.run_id(parent_run) if parent_run is not None else None
        if branch_epoch is not None and parent is None:
            raise StoreError("branch_epoch given without a parent_run")
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO runs(name, started_at, updated_at, status, seed, code_version, package_version, optimizer,"
                " hyperparameters, optimizer_config, parent_run, branch_epoch, branch_step, num_groups)"
                " VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name, utc_now(), utc_now(), seed, code_version, package_version, optimizer,
                    json.dumps(to_jsonable(dict(hyperparameters or {})), sort_keys=True),
                    json.dumps(to_jsonable(optimizer_config if optimizer_config is not None else [])),
                    parent, branch_epoch, branch_step, num_groups,
                ),
            )
            return int(cur.lastrowid)

    def set_status(self, run: int | str, status: str) -> None:
        """Marks a run running, finished or failed."""
        if status not in RUN_STATUSES:
            raise StoreError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        run_id = self.run_id(run)
        finished = utc_now() if status != "running" else None
        with self._write() as conn:
            conn.execute(
                "UPDATE runs SET status=?, finished_at=?, updated_at=? WHERE run_id=?", (status, finished, utc_now(), run_id)
            )

    def write_steps(
        self, run_id: int, columns: Sequence[str], rows: Sequence[Sequence[Any]], group_rows: Sequence[Sequence[Any]] = ()
    ) -> None:
        """Appends step rows (columns after run_id) and per-group rows (`columns` with grp after step).

        One transaction; a step already present is an error (a resumed run truncates first).
        """
        cols = ["run_id", *columns]
        gcols = ["run_id", columns[0], "grp", *columns[1:]]
        with self._write() as conn:
            # Rows are tuples of Python numbers from the recorder: bound as they are (no per-value pass).
            if rows:
                conn.executemany(
                    f"INSERT INTO steps({', '.join(map(_quote, cols))}) VALUES ({', '.join('?' * len(cols))})",
                    [(run_id, *r) for r in rows],
                )
            if group_rows:
                conn.executemany(
                    f"INSERT INTO step_groups({', '.join(map(_quote, gcols))}) VALUES ({', '.join('?' * len(gcols))})",
                    [(run_id, *r) for r in group_rows],
                )
            conn.execute("UPDATE runs SET updated_at=? WHERE run_id=?", (utc_now(), run_id))

    def write_epoch(
        self,
        run_id: int,
        row: Mapping[str, Any],
        layer_columns: Sequence[str] = (),
        layer_rows: Sequence[Sequence[Any]] = (),
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Writes one epoch row, its per-layer rows and its metrics in one transaction."""
        epoch = int(row["epoch"])
        cols = ["run_id", *row.keys()]
        lcols = ["run_id", "epoch", *layer_columns]
        with self._write() as conn:
            conn.execute(
                f"INSERT INTO epochs({', '.join(map(_quote, cols))}) VALUES ({', '.join('?' * len(cols))})",
                (run_id, *map(_clean, row.values())),
            )
            if layer_rows:
                conn.executemany(
                    f"INSERT INTO layer_epochs({', '.join(map(_quote, lcols))}) VALUES ({', '.join('?' * len(lcols))})",
                    [(run_id, epoch, *map(_clean, r)) for r in layer_rows],
                )
            self._insert_metrics(conn, run_id, epoch, metrics or {})
            conn.execute("UPDATE runs SET updated_at=? WHERE run_id=?", (utc_now(), run_id))

    def write_metrics(self, run_id: int, epoch: int, metrics: Mapping[str, float]) -> None:
        """Adds metrics of one epoch (an epoch already recorded, e.g. a late validation)."""
        with self._write() as conn:
            self._insert_metrics(conn, run_id, epoch, metrics)

    def _insert_metrics(self, conn: sqlite3.Connection, run_id: int, epoch: int, metrics: Mapping[str, float]) -> None:
        if not metrics:
            return
        names = list(metrics)
        placeholders = ", ".join("?" * len(names))
        clash = conn.execute(
            f"SELECT name FROM metrics WHERE run_id=? AND epoch=? AND name IN ({placeholders})", (run_id, epoch, *names)
        ).fetchall()
        if clash:
            raise MetricClashError(
                f"metric(s) {sorted(r[0] for r in clash)} already logged for epoch {epoch} of run {run_id}; "
                "each metric is logged once per epoch"
            )
        conn.executemany(
            "INSERT INTO metrics(run_id, epoch, name, value) VALUES (?, ?, ?, ?)",
            [(run_id, epoch, k, float(v)) for k, v in metrics.items()],
        )

    def record_checkpoint(self, run_id: int, step: int, epochs_done: int, path: str | Path) -> None:
        """Notes that a checkpoint of `run_id` after `step` steps and `epochs_done` epochs is at `path`."""
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO checkpoints(run_id, step, epochs_done, path, saved_at) VALUES (?, ?, ?, ?, ?)",
                (run_id, step, epochs_done, str(Path(path).resolve()), utc_now()),
            )

    def truncate_run(self, run_id: int, *, step: int, epoch: int, status: str = "running") -> dict[str, int]:
        """Deletes the run's rows beyond a position, in one transaction, and sets its status.

        Rows of steps > `step` go (steps, step groups, checkpoints), and epoch-level rows
        (epochs, layers, metrics) of epochs >= `epoch` (`epoch` is the number of epochs completed
        at that position). Returns the number of rows deleted per table.
        """
        deleted = {}
        with self._write() as conn:
            for table, column in _RUN_TABLES.items():
                bound = step if column == "step" else epoch
                op = ">" if column == "step" else ">="
                cur = conn.execute(f"DELETE FROM {table} WHERE run_id=? AND {column} {op} ?", (run_id, bound))
                deleted[table] = cur.rowcount
            conn.execute(
                "UPDATE runs SET status=?, finished_at=NULL, updated_at=? WHERE run_id=?", (status, utc_now(), run_id)
            )
        return deleted

    def delete_run(self, run: int | str) -> None:
        """Deletes a run and all its rows (refused while branches of it exist)."""
        run_id = self.run_id(run)
        with self._write() as conn:
            children = [r[0] for r in conn.execute("SELECT run_id FROM runs WHERE parent_run=?", (run_id,))]
            if children:
                raise StoreError(f"run {run_id} has branches {children}: delete them first")
            for table in _RUN_TABLES:
                conn.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))
            conn.execute("DELETE FROM runs WHERE run_id=?", (run_id,))

    # ---- reading ----------------------------------------------------------------------------
    def run_id(self, run: int | str) -> int:
        """The id of a run given by id or by name (the latest run of that name).

        Raises:
            UnknownRunError: no such run (the message lists the runs there are).
        """
        if isinstance(run, bool) or not isinstance(run, (int, str)):
            if hasattr(run, "__index__"):
                run = int(run)  # numpy integers from a DataFrame
            else:
                raise StoreError(f"a run is given by its id (int) or name (str), got {run!r}")
        with self._lock:
            if isinstance(run, int):
                row = self.conn.execute("SELECT run_id FROM runs WHERE run_id=?", (run,)).fetchone()
            else:
                row = self.conn.execute(
                    "SELECT run_id FROM runs WHERE name=? ORDER BY run_id DESC LIMIT 1", (run,)
                ).fetchone()
                if row is None and run.isdigit():
                    row = self.conn.execute("SELECT run_id FROM runs WHERE run_id=?", (int(run),)).fetchone()
            if row is not None:
                return int(row[0])
            known = self.conn.execute("SELECT run_id, name FROM runs ORDER BY run_id").fetchall()
        listing = ", ".join(f"{i}:{n}" for i, n in known[:20]) or "none"
        raise UnknownRunError(f"no run {run!r} in {self.path} (runs: {listing})")

    def run_info(self, run: int | str) -> dict[str, Any]:
        """One run's row as a dict (hyperparameters parsed)."""
        df = self.runs()
        row = df[df["run_id"] == self.run_id(run)].iloc[0]
        return row.to_dict()

    def _query(self, sql: str, params: Sequence[Any] = (), table: str | None = None) -> pd.DataFrame:
        with self._lock:
            df = pd.read_sql_query(sql, self.conn, params=list(params))
            if table is not None:
                for col in self._real_columns(table):
                    if col in df.columns:
                        df[col] = df[col].astype("float64")  # all-NULL (NaN) columns come back as object
        return df

    def _where(self, run: int | str | None) -> tuple[str, tuple]:
        if run is None:
            return "", ()
        return " WHERE run_id=?", (self.run_id(run),)

    def runs(self) -> pd.DataFrame:
        """One row per run: run_id, name, started_at, status, seed, code_version, parent_run,
        branch_epoch, hyperparameters (a dict), and the rest of the runs table."""
        df = self._query("SELECT * FROM runs ORDER BY run_id")
        for col in ("hyperparameters", "optimizer_config"):
            df[col] = df[col].map(lambda s: json.loads(s) if isinstance(s, str) else s)
        for col in ("seed", "parent_run", "branch_epoch", "branch_step", "num_groups"):
            df[col] = df[col].astype("Int64")  # nullable: a root run has no parent
        first = ["run_id", "name", "started_at", "status", "seed", "code_version", "parent_run", "branch_epoch", "hyperparameters"]
        return df[first + [c for c in df.columns if c not in first]]

    def steps(self, run: int | str | None = None) -> pd.DataFrame:
        """Per-step rows: run_id, step, epoch, lr, weight_decay, beta1, beta2, eps (group 0) and
        the overall step figures. All runs when `run` is None."""
        where, params = self._where(run)
        return self._query(f"SELECT * FROM steps{where} ORDER BY run_id, step", params, "steps")

    def step_groups(self, run: int | str | None = None) -> pd.DataFrame:
        """Per-step, per-param-group rows (run_id, step, grp, epoch, hyperparameters, figures).

        Runs with a single param group are stored once, in `steps`: they appear here as grp 0.
        """
        where, params = self._where(run)
        gcols = [c for c in self.columns("step_groups")]
        scols = set(self.columns("steps"))
        select = ", ".join("0 AS grp" if c == "grp" else (_quote(c) if c in scols else f"NULL AS {_quote(c)}") for c in gcols)
        with self._snapshot():
            single = self._query(
                f"SELECT {select} FROM steps WHERE run_id IN (SELECT run_id FROM runs WHERE COALESCE(num_groups, 1) <= 1)"
                + (" AND run_id=?" if params else "") + " ORDER BY run_id, step",
                params,
                "step_groups",
            )
            multi = self._query(f"SELECT * FROM step_groups{where} ORDER BY run_id, step, grp", params, "step_groups")
        frames = [f for f in (single, multi) if len(f)]
        if not frames:
            return multi
        return pd.concat(frames, ignore_index=True).sort_values(["run_id", "step", "grp"], ignore_index=True)

    def metrics(self, run: int | str | None = None) -> pd.DataFrame:
        """User metrics, long form: run_id, epoch, name, value."""
        where, params = self._where(run)
        return self._query(f"SELECT run_id, epoch, name, value FROM metrics{where} ORDER BY run_id, epoch, name", params, "metrics")

    def epochs(self, run: int | str | None = None, *, with_metrics: bool = True) -> pd.DataFrame:
        """Per-epoch rows: run_id, epoch, step (the epoch's last step), lr, weight_decay, the epoch
        geometry, f_mean/f_min/f_max of each step figure, and the user metrics as columns."""
        where, params = self._where(run)
        with self._snapshot():  # the epoch rows and their metrics from one committed state
            df = self._query(f"SELECT * FROM epochs{where} ORDER BY run_id, epoch", params, "epochs")
            metrics = self.metrics(run) if with_metrics else None
        if metrics is not None and len(metrics):
            wide = metrics.pivot_table(index=["run_id", "epoch"], columns="name", values="value", aggfunc="first", dropna=False)
            wide.columns.name = None
            wide = wide.reset_index()
            df = df.merge(wide, on=["run_id", "epoch"], how="left")
        return df

    def layers(self, run: int | str | None = None) -> pd.DataFrame:
        """Per-epoch, per-tensor rows: run_id, epoch, layer_index, layer, grp, numel, the epoch
        geometry of the tensor and the epoch's last step's figures of the tensor."""
        where, params = self._where(run)
        return self._query(f"SELECT * FROM layer_epochs{where} ORDER BY run_id, epoch, layer_index", params, "layer_epochs")

    def checkpoints(self, run: int | str | None = None) -> pd.DataFrame:
        """Checkpoints written by the recorder: run_id, step, epochs_done, path, saved_at."""
        where, params = self._where(run)
        return self._query(f"SELECT * FROM checkpoints{where} ORDER BY run_id, step", params)

    def lineage(self, run: int | str) -> list[int]:
        """The run's ancestry, root first: [root, ..., parent, run]."""
        runs = self.runs().set_index("run_id")
        chain = [self.run_id(run)]
        while True:
            parent = runs.loc[chain[-1], "parent_run"]
            if pd.isna(parent) or int(parent) in chain:
                break
            chain.append(int(parent))
        return chain[::-1]

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` ('ok' when the file is sound)."""
        with self._lock:
            return "\n".join(r[0] for r in self.conn.execute("PRAGMA integrity_check"))


def wait_for_store(path: str | Path, timeout: float = 60.0, poll: float = 0.05, **kwargs: Any) -> RunStore:
    """Opens a store that another process is about to create (readers started before training).

    Keyword arguments go to `RunStore` (e.g. ``readonly=True``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return RunStore(path, **kwargs)
        except (FileNotFoundError, NotAStoreError):
            if time.monotonic() > deadline:
                raise
            time.sleep(poll)


__all__ = [
    "RunStore",
    "StoreError",
    "NotAStoreError",
    "SchemaVersionError",
    "UnknownRunError",
    "MetricClashError",
    "SCHEMA_VERSION",
    "APPLICATION_ID",
    "HYPER_COLUMNS",
    "wait_for_store",
]
