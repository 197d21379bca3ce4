"""The run store: one SQLite file per experiment holding every run's telemetry.

    store = RunStore("runs/exp.sqlite")          # open an existing store (readers)
    store.runs()                                 # one row per run, with lineage
    store.steps("baseline"), store.epochs(3)     # pandas DataFrames

Why SQLite: it is in the standard library, one file is one experiment (easy to copy, archive and
attach to a paper), and in WAL mode a report can read while training writes. A write commits
atomically, so a ``kill -9`` loses at most the rows not yet handed to the store and never leaves a
half-written file behind (``synchronous=NORMAL`` in WAL mode is durable against process crashes;
a power cut can lose the last commits, which is why `RunStore.sync` exists: the recorder calls it
before it writes a checkpoint, so that no checkpoint ever refers to rows a power cut could lose).

Run ownership: a run has at most one writer at a time, recorded as a lease (writer id, host, pid,
heartbeat) in the store. `RunStore.create_run` takes it, `RunStore.acquire_lease` takes it on
resume, and every write of the run checks it inside its own transaction: a second writer gets
`RunLeaseError` naming the holder, and a writer whose lease was taken over (``takeover=True``
after it expired) gets `LeaseLostError` on its next write, which then writes nothing.

Schema (version `SCHEMA_VERSION`, kept in ``PRAGMA user_version``; our files carry
``PRAGMA application_id`` = `APPLICATION_ID` so that a foreign database is recognised and left
untouched):

    meta(key, value)                               format marker, creation time, package version
    runs(run_id, name, started_at, updated_at, finished_at, status, status_detail, seed,
         code_version, package_version, optimizer, hyperparameters JSON, optimizer_config JSON,
         parent_run, branch_epoch, branch_step, num_groups, hyperparameter_columns JSON)
    steps(run_id, step, epoch, lr, weight_decay, skipped, grad_scale, <hyperparameters>, <figures>)
        overall figures per recorded step; the hyperparameters are those of param group 0
    step_groups(run_id, step, grp, epoch, lr, weight_decay, skipped, grad_scale, <hyperparameters>,
                <step figures>)
        per-group figures; written only when the optimizer has more than one param group
        (`RunStore.step_groups` presents the steps table as group 0 otherwise)
    epochs(run_id, epoch, step, num_steps, recorded_steps, skipped_steps, wall_time, lr,
           weight_decay, <hyperparameters>, <epoch geometry>, <f_mean, f_min, f_max of each figure>)
    layer_epochs(run_id, epoch, layer_index, layer, grp, numel, <epoch geometry per tensor>,
                 <the epoch's last step's figures per tensor>)
    metrics(run_id, epoch, name, value, step, seq) user metrics, long form; step: the recorder's step
                                                  count when a late metric was logged (NULL with the
                                                  epoch row); seq: the store-wide order of writes
    checkpoints(run_id, step, epochs_done, path, saved_at)
    leases(run_id, writer, host, pid, pid_namespace, acquired_at, heartbeat, expire_after)
    gaps(gap_id, run_id, from_step, to_step, from_epoch, to_epoch, reason, marked_at)
    study_branches(branch_id, run_id, parent_run, branch_epoch, seed, spec JSON, status, error,
                   attempts, updated_at)      branching studies' specs; created on demand (no version bump)
    lr_decisions(run_id, seq, epoch, step, rule, grp, action, lr_before, lr_after, figure, value,
                 detail JSON)   learning-rate rules' decisions (core.lr_rules); created when a
                                 store is opened for writing, so older v2 files gain it
    histograms(run_id, step, epoch, layer_index, layer, kind, first_bin, counts JSON)
        the kernel's per-tensor log2 histograms (|g|, |Δθ|, effective step size) of the steps an
        optimizer with `histogram_every` took them at; counts of bins first_bin, first_bin+1, ...
        (core/histogram.py defines the bins). Created by the first write to a store that lacks
        it (no schema version change: older readers ignore it)

Hyperparameter columns are not Adam's alone: beyond ``lr`` and ``weight_decay`` (which every
torch optimizer has) they are created on demand from the names the writer passes (beta1, beta2,
eps for Adam; momentum, dampening, nesterov for SGD; alpha, centered for RMSprop, ...), and the
runs table records which ones each run has (`RunStore.hyperparameter_columns`). The figure columns
are added the same way (``ALTER TABLE ADD COLUMN``), so a figure new to the statistics table needs
no schema migration. SQLite stores NaN as NULL: loaders turn it back into NaN.

Version 1 files (written before run leases and per-optimizer hyperparameters) open and read the
same; the first write migrates them to version 2 in one transaction (a read-only open never
does).

This module does not import torch: a report or a dashboard reads the store with pandas alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
import warnings
import weakref
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

#: ``PRAGMA application_id`` of our files ("IADS": instrumented_adam store).
APPLICATION_ID = 0x49414453
#: ``PRAGMA user_version`` written by this code; newer files are refused, not guessed at.
SCHEMA_VERSION = 2
FORMAT_MARKER = "instrumented_adam.runstore"

#: Adam's hyperparameters, as recorded beside every step and epoch row by version 1 stores. Kept
#: for old callers; a run's own columns are `RunStore.hyperparameter_columns` (not Adam's alone).
HYPER_COLUMNS: tuple[str, ...] = ("lr", "weight_decay", "beta1", "beta2", "eps")

#: Hyperparameter names the store recognises as such when a writer does not name its
#: hyperparameter columns explicitly (torch.optim's numeric group options, flattened).
KNOWN_HYPERPARAMETERS: tuple[str, ...] = (
    "lr", "weight_decay", "beta1", "beta2", "eps", "momentum", "dampening", "nesterov", "alpha",
    "centered", "lr_decay", "initial_accumulator_value", "rho", "amsgrad", "maximize",
    "momentum_decay", "decoupled_weight_decay", "lambd", "t0", "etaminus", "etaplus",
    "step_size_min", "step_size_max",
)

#: Every run has these hyperparameter columns (all torch optimizers have an lr; almost all a
#: weight decay), so that readers of an empty store still find them.
BASE_HYPER_COLUMNS: tuple[str, ...] = ("lr", "weight_decay")

RUN_STATUSES = ("running", "finished", "failed", "diverged")

#: Default seconds after its last heartbeat before a writer's lease may be taken over.
DEFAULT_LEASE_EXPIRY = 300.0

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_RUNS_TABLE = f"""
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
    num_groups INTEGER,
    status_detail TEXT,
    hyperparameter_columns TEXT
)"""

# Tables new in version 2 (also created by the migration of version 1 files).
_V2_TABLES = """
CREATE TABLE leases (
    run_id INTEGER PRIMARY KEY REFERENCES runs(run_id),
    writer TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_namespace TEXT,
    acquired_at TEXT NOT NULL,
    heartbeat REAL NOT NULL,
    expire_after REAL NOT NULL
);
CREATE TABLE gaps (
    gap_id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    from_step INTEGER,
    to_step INTEGER,
    from_epoch INTEGER,
    to_epoch INTEGER,
    reason TEXT NOT NULL,
    marked_at TEXT NOT NULL
);
CREATE INDEX gaps_run ON gaps(run_id);
CREATE INDEX metrics_seq ON metrics(seq)
"""

# Columns new in version 2 in the row tables (added by the migration; NULL in old rows: unknown).
_V2_ROW_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "steps": (("skipped", "INTEGER"), ("grad_scale", "REAL")),
    "step_groups": (("skipped", "INTEGER"), ("grad_scale", "REAL")),
    "epochs": (("skipped_steps", "INTEGER"),),
    "metrics": (("step", "INTEGER"), ("seq", "INTEGER")),
}

_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
{_RUNS_TABLE};
CREATE INDEX runs_name ON runs(name);
CREATE TABLE steps (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    step INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    lr REAL, weight_decay REAL,
    skipped INTEGER, grad_scale REAL,
    PRIMARY KEY (run_id, step)
) WITHOUT ROWID;
CREATE TABLE step_groups (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    step INTEGER NOT NULL,
    grp INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    lr REAL, weight_decay REAL,
    skipped INTEGER, grad_scale REAL,
    PRIMARY KEY (run_id, step, grp)
) WITHOUT ROWID;
CREATE TABLE epochs (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    epoch INTEGER NOT NULL,
    step INTEGER NOT NULL,
    num_steps INTEGER NOT NULL,
    recorded_steps INTEGER NOT NULL,
    skipped_steps INTEGER,
    wall_time REAL,
    lr REAL, weight_decay REAL,
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
    step INTEGER,
    seq INTEGER,
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
{_V2_TABLES}
"""

# The step histograms (histogram_every): created by the first write of a store that lacks it, so
# that existing schema-2 files gain it without a version change.
_HISTOGRAMS_TABLE = """
CREATE TABLE IF NOT EXISTS histograms (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    step INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    layer_index INTEGER NOT NULL,
    layer TEXT NOT NULL,
    kind TEXT NOT NULL,
    first_bin INTEGER NOT NULL,
    counts TEXT NOT NULL,
    PRIMARY KEY (run_id, step, layer_index, kind)
) WITHOUT ROWID"""

# Tables holding rows of a run, and the position column that orders them (for truncation).
_RUN_TABLES: dict[str, str] = {
    "steps": "step",
    "step_groups": "step",
    "epochs": "epoch",
    "layer_epochs": "epoch",
    "metrics": "epoch",
    "checkpoints": "step",
    "histograms": "step",
}
# Tables added within schema 2 (no version bump): created by the first open for writing, read as
# empty where missing; rows of a run, with the epoch column that orders them (for truncation).
_OPTIONAL_RUN_TABLES: dict[str, str] = {"lr_decisions": "epoch"}
_OPTIONAL_TABLE_SQL: dict[str, str] = {
    "lr_decisions": """
CREATE TABLE IF NOT EXISTS lr_decisions (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    step INTEGER NOT NULL,
    rule TEXT NOT NULL,
    grp INTEGER NOT NULL,
    action TEXT NOT NULL,
    lr_before REAL, lr_after REAL,
    figure TEXT NOT NULL,
    value REAL,
    detail TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID"""
}
# The tables whose rows a checkpoint's position counts (checkpoints themselves are bookkeeping).
_POSITION_TABLES = ("steps", "step_groups", "epochs", "layer_epochs", "metrics")

# Seconds between heartbeat writes of a busy writer (leases expire after minutes).
_HEARTBEAT_EVERY = 1.0

_NULLABLE_COUNTS = frozenset({"skipped", "skipped_steps"})

_SQLITE_MAGIC = b"SQLite format 3\x00"
_JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")


#: Key of a run's hyperparameters that says what "distance from init" (‖θ − θ₀‖) is measured from,
#: when it is not the training's initialisation (a run that continues a torch.optim checkpoint).
THETA0_ORIGIN_KEY = "theta0_origin"


class StoreError(ValueError):
    """A store cannot be opened or used as asked (the message says why)."""


class NotAStoreError(StoreError):
    """The file is not an instrumented_adam run store (not SQLite, or someone else's database)."""


class CorruptStoreError(NotAStoreError):
    """The file is one of our stores (or SQLite) but damaged: truncated, or malformed inside."""


class HotJournalError(StoreError):
    """An interrupted write left a rollback journal that only a writable open can roll back."""


class ReadOnlyStoreError(StoreError):
    """The store (or its directory) cannot be written: open it with ``readonly=True``."""


class SchemaVersionError(StoreError):
    """The store was written by a newer instrumented_adam than the one reading it."""


class UnknownRunError(StoreError, KeyError):
    """No run with that name or id in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MetricClashError(StoreError):
    """A metric is logged twice for one epoch, or named like a built-in column."""


class RunLeaseError(StoreError):
    """Another writer holds the run's lease (the message names it and says how to take over)."""


class LeaseLostError(RunLeaseError):
    """This writer's lease was taken over by another writer: the write was refused, nothing written."""


class StoreGapError(StoreError):
    """The store lacks rows that a checkpoint's position says it held."""


def utc_now() -> str:
    """The current time as ISO 8601 UTC with microseconds (sorts as text)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


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


# ---- who is writing: this process's identity and the liveness of other writers ---------------
def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux), so that a pid is only judged within its namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


#: Lease writer ids held by open RunStore objects of this process (to tell a live holder in this
#: process from one whose store object was closed or collected without releasing).
_LIVE_WRITERS: "weakref.WeakValueDictionary[str, RunStore]" = weakref.WeakValueDictionary()


def _holder_is_gone(host: str, pid: int, namespace: str | None, writer: str) -> bool:
    """True when the lease holder is known to be dead: same host and pid namespace, and its
    process no longer runs (or, in this process, its store object is closed). Anything that
    cannot be judged from here (another host, another container) counts as alive."""
    if host != socket.gethostname() or namespace != _pid_namespace():
        return False
    if pid == os.getpid():
        return writer not in _LIVE_WRITERS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists, owned by someone else
    try:  # a killed child not yet reaped by its parent is a zombie: dead for our purposes
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def _describe_open_failure(path: Path, error: sqlite3.Error, readonly: bool) -> StoreError:
    """The accurate reason a file cannot be opened as a store (truncated, hot journal, read-only
    directory, not SQLite), from its bytes and its directory; never "not a database" for all."""
    try:
        with open(path, "rb") as f:
            header = f.read(100)
        size = path.stat().st_size
    except OSError as e:
        return StoreError(f"cannot read {path}: {e}")
    journal = Path(f"{path}-journal")
    if 0 < len(header) < 100 and _SQLITE_MAGIC.startswith(header[:16]):
        return CorruptStoreError(f"{path} is truncated: {size} bytes, shorter than an SQLite header; restore it from a copy")
    if header[:16] == _SQLITE_MAGIC:
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(header[28:32], "big")
        valid = header[24:28] == header[92:96]  # the page count is trustworthy only then
        if valid and page_size and pages * page_size > size:
            return CorruptStoreError(
                f"{path} is truncated: its header says {pages} pages of {page_size} bytes "
                f"({pages * page_size} bytes), the file has {size}; it was cut short by a copy or a full "
                "disk: restore it from a complete copy"
            )
        try:
            with open(journal, "rb") as f:
                hot = f.read(8) == _JOURNAL_MAGIC
        except OSError:
            hot = False
        if hot:
            return HotJournalError(
                f"{path} has a hot journal ({journal.name}) left by a write that was interrupted: open it "
                "once with write access (readonly=False, in a writable directory) so that SQLite rolls the "
                "interrupted transaction back, or copy both files together to such a place"
            )
        if not os.access(path.parent, os.W_OK) or (not readonly and not os.access(path, os.W_OK)):
            return ReadOnlyStoreError(
                f"{path} is in a read-only directory (or is read-only itself), so SQLite cannot create its "
                f"-wal/-shm files ({error}); open it with RunStore(path, readonly=True) to read it"
            )
        return CorruptStoreError(f"{path} is an SQLite file but damaged inside ({error}); restore it from a copy")
    return NotAStoreError(f"{path} is not an instrumented_adam run store: not an SQLite database ({error})")


class RunStore:
    """One experiment's SQLite store of runs: the recorder writes it, loaders read it.

    Args:
        path: the database file.
        create: create and initialise the file when it does not exist (or is empty). Readers
            leave it False, so that a typo in a path is an error rather than a new empty store.
        readonly: open with ``mode=ro`` (a reader that must not write, e.g. on a shared volume).
            In a read-only directory, where SQLite cannot create the ``-shm`` file WAL needs, the
            file is opened ``immutable=1`` (`immutable` is then True): fine for archived stores;
            commits still in a ``-wal`` file are not seen (a warning says so).
        timeout: seconds to wait for another process's write lock before failing.

    Raises:
        FileNotFoundError: no file at `path` and `create` is False.
        NotAStoreError: the file is not SQLite, or is an SQLite database of something else.
        CorruptStoreError: the file is truncated or damaged.
        HotJournalError: an interrupted write left a journal that a read-only open cannot undo.
        ReadOnlyStoreError: the directory or file is read-only and `readonly` was not asked for.
        SchemaVersionError: the store was written by a newer version of this package.

    A store object may be shared between threads (calls are serialised by a lock); open one per
    process. Loaders accept a run as its id or its name (the latest run of that name).
    """

    def __init__(self, path: str | Path, *, create: bool = False, readonly: bool = False, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.immutable = False
        self._lock = threading.RLock()
        self._leases: dict[int, str] = {}  # run_id -> this object's writer id for that run
        self._columns_cache: dict[str, set[str]] = {}
        self._hyper_noted: dict[int, set[str]] = {}  # run_id -> hyperparameter names already recorded
        self._last_beat: dict[int, float] = {}  # run_id -> when this object last refreshed the heartbeat
        self._conn: sqlite3.Connection | None = None
        self._histograms_ready = False  # the histograms table exists (created by the first write)
        if not self.path.exists():
            if not create or readonly:
                raise FileNotFoundError(f"no run store at {self.path} (pass create=True to make one)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif self.path.is_dir():
            raise NotAStoreError(f"{self.path} is a directory, not a run store")
        conn = self._connect(timeout)
        self._conn = conn
        try:
            self._open(create and not readonly)
        except sqlite3.Error as e:
            conn.close()
            self._conn = None
            raise _describe_open_failure(self.path, e, readonly) from e
        except BaseException:
            conn.close()
            self._conn = None
            raise

    def _connect(self, timeout: float) -> sqlite3.Connection:
        kwargs = dict(timeout=timeout, isolation_level=None, check_same_thread=False)
        if not self.readonly:
            return sqlite3.connect(self.path, **kwargs)
        uri = self.path.resolve().as_uri()
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, **kwargs)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.DatabaseError as e:
            # A WAL store in a directory we cannot write: no -shm can be made, so read it as an
            # immutable file. Anything else (a hot journal, a damaged file) is diagnosed instead.
            conn.close()
            diagnosis = _describe_open_failure(self.path, e, True)
            if not isinstance(diagnosis, ReadOnlyStoreError):
                raise diagnosis from e
        wal = Path(f"{self.path}-wal")
        if wal.exists() and wal.stat().st_size > 0:
            warnings.warn(
                f"{self.path} is in a read-only directory and has a {wal.stat().st_size}-byte -wal file: it is "
                "read as an immutable file, without the commits still in the -wal (copy the store, with its "
                "-wal, to a writable place to see them)",
                RuntimeWarning,
                stacklevel=3,
            )
        self.immutable = True
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, **kwargs)

    # ---- opening ----------------------------------------------------------------------------
    def _identify(self) -> tuple[int, int, list[str]]:
        """application_id, user_version and table names, read without writing anything."""
        try:
            app_id = self.conn.execute("PRAGMA application_id").fetchone()[0]
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            tables = [r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        except sqlite3.DatabaseError as e:
            raise _describe_open_failure(self.path, e, self.readonly) from e
        return app_id, version, tables

    def _open(self, create: bool) -> None:
        app_id, version, tables = self._identify()
        if app_id != APPLICATION_ID:
            if app_id == 0 and version == 0 and not tables:
                if not create:
                    raise NotAStoreError(f"{self.path} is an empty SQLite file, not an initialised run store")
                self._initialise()
                version = SCHEMA_VERSION
            else:
                shown = ", ".join(sorted(tables)[:8]) or "none"
                raise NotAStoreError(
                    f"{self.path} is an SQLite database but not an instrumented_adam run store "
                    f"(application_id={app_id:#x}, tables: {shown}); refusing to touch it"
                )
        else:
            self._check_version(version)
        self._version = version
        if not self.readonly:
            # Only now, with the file known to be ours: switching to WAL writes to the header.
            try:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.OperationalError as e:
                raise _describe_open_failure(self.path, e, False) from e
        self.conn.execute("PRAGMA foreign_keys=ON")
        if not self.readonly and version == SCHEMA_VERSION:
            self._ensure_optional_tables()

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path} has schema version {version}, newer than the {SCHEMA_VERSION} this "
                "instrumented_adam understands: upgrade instrumented_adam to read it"
            )
        if version < 1:
            raise NotAStoreError(f"{self.path} carries our application id but no schema (version {version})")

    def _initialise(self) -> None:
        with self._write(migrate=False):
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

    @property
    def schema_version(self) -> int:
        """The schema version of the file (1 until the first write migrates an old store)."""
        return self._version

    def _migrate(self) -> None:
        """Brings a version 1 file to version 2 in one transaction (on the first write only).

        The runs table is rebuilt (its status CHECK gains 'diverged'; SQLite cannot alter a
        CHECK), the v2 columns and tables are added, and every existing run is recorded as having
        Adam's hyperparameter columns, which is what version 1 wrote. Rows are not touched.
        """
        conn = self.conn
        conn.execute("PRAGMA foreign_keys=OFF")  # only outside a transaction; the rebuild drops runs
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version == 1:  # not migrated meanwhile by another process
                    old = [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
                    conn.execute(_RUNS_TABLE.replace("CREATE TABLE runs", "CREATE TABLE runs_v2"))
                    cols = ", ".join(map(_quote, old))
                    conn.execute(f"INSERT INTO runs_v2({cols}) SELECT {cols} FROM runs")
                    conn.execute("DROP TABLE runs")
                    conn.execute("ALTER TABLE runs_v2 RENAME TO runs")
                    conn.execute("CREATE INDEX runs_name ON runs(name)")
                    conn.execute("UPDATE runs SET hyperparameter_columns=?", (json.dumps(list(HYPER_COLUMNS)),))
                    for table, columns in _V2_ROW_COLUMNS.items():
                        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                        for name, kind in columns:
                            if name not in have:
                                conn.execute(f"ALTER TABLE {table} ADD COLUMN {_quote(name)} {kind}")
                    for statement in _V2_TABLES.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    problems = conn.execute("PRAGMA foreign_key_check").fetchall()
                    if problems:
                        raise StoreError(f"{self.path}: migration to schema 2 found broken references {problems[:5]}")
                    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('migrated_to_2', ?)", (utc_now(),))
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.execute("PRAGMA foreign_keys=ON")
        self._version = SCHEMA_VERSION
        self._columns_cache.clear()

    # ---- plumbing ---------------------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        """The open connection (raises after `close`)."""
        if self._conn is None:
            raise StoreError(f"the run store {self.path} is closed")
        return self._conn

    @contextmanager
    def _write(self, *, migrate: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it commits, or none of it."""
        if self.readonly:
            raise StoreError(f"the run store {self.path} was opened read-only")
        with self._lock:
            conn = self.conn
            if migrate and self._version < SCHEMA_VERSION:
                self._migrate()
            # IMMEDIATE takes the write lock up front: no deadlock when two writers upgrade.
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                if "readonly" in str(e) or "read-only" in str(e):
                    raise ReadOnlyStoreError(f"{self.path} cannot be written ({e}): open it with readonly=True") from e
                raise
            try:
                if migrate and not self._histograms_ready:  # not while _initialise checks for foreign tables
                    self._create_histograms_table(conn)
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                self._histograms_ready = False  # its CREATE may have been rolled back too
                self._columns_cache.clear()  # an ALTER of the rolled-back transaction is undone
                self._hyper_noted.clear()
                self._last_beat.clear()
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
        """Releases this object's run leases and closes the connection (idempotent)."""
        with self._lock:
            if self._conn is None:
                return
            for run_id in list(self._leases):
                try:
                    self.release_lease(run_id)
                except (sqlite3.Error, StoreError):
                    pass  # a lease that cannot be released expires, or dies with this process
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
        if table not in _RUN_TABLES and table not in ("runs", "meta", "leases", "gaps"):
            raise StoreError(f"unknown table {table!r}")
        with self._lock:
            return [r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")]

    def _has_table(self, table: str) -> bool:
        with self._lock:
            return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone() is not None

    def _real_columns(self, table: str) -> list[str]:
        with self._lock:
            # Plus the nullable counts (skipped, skipped_steps): NULL (unknown, old rows) reads as NaN.
            return [r[1] for r in self.conn.execute(f"PRAGMA table_info({table})") if r[2].upper() == "REAL" or r[1] in _NULLABLE_COUNTS]

    def _add_missing_columns(self, conn: sqlite3.Connection, table: str, names: Iterable[str]) -> None:
        """Inside a write transaction: REAL columns for the names `table` lacks (on demand)."""
        known = self._columns_cache.get(table)
        names = list(names)
        if known is not None and all(n in known for n in names):
            return
        known = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}  # another process may have added some
        for name in names:
            if name not in known:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {_quote(name)} REAL")
                known.add(name)
        self._columns_cache[table] = known

    # ---- run ownership (leases) -------------------------------------------------------------
    def _lease_row(self, conn: sqlite3.Connection, run_id: int) -> dict[str, Any] | None:
        row = conn.execute(
            "SELECT writer, host, pid, pid_namespace, acquired_at, heartbeat, expire_after FROM leases WHERE run_id=?",
            (run_id,),
        ).fetchone()
        if row is None:
            return None
        keys = ("writer", "host", "pid", "pid_namespace", "acquired_at", "heartbeat", "expire_after")
        return dict(zip(keys, row))

    def _describe_holder(self, run_id: int, holder: Mapping[str, Any]) -> str:
        age = time.time() - holder["heartbeat"]
        name = self.conn.execute("SELECT name FROM runs WHERE run_id=?", (run_id,)).fetchone()
        here = "; that is this process, through another open RunStore: close that recorder or store first" if (
            holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()) else ""
        return (
            f"run {run_id} ({name[0] if name else '?'!r}) of {self.path} is held by writer {holder['writer']} "
            f"(host {holder['host']}, pid {holder['pid']}{here}), last heartbeat {_iso(holder['heartbeat'])} "
            f"({age:.0f} s ago; its lease expires {holder['expire_after']:.0f} s after the last heartbeat)"
        )

    def _take(self, conn: sqlite3.Connection, run_id: int, expire_after: float) -> str:
        writer = uuid.uuid4().hex
        now = time.time()
        conn.execute(
            "INSERT OR REPLACE INTO leases(run_id, writer, host, pid, pid_namespace, acquired_at, heartbeat, expire_after)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, writer, socket.gethostname(), os.getpid(), _pid_namespace(), utc_now(), now, float(expire_after)),
        )
        return writer

    def _claim(self, conn: sqlite3.Connection, run_id: int, *, takeover: bool, expire_after: float) -> str:
        """Inside a write transaction: takes the run's lease or raises RunLeaseError."""
        holder = self._lease_row(conn, run_id)
        mine = self._leases.get(run_id)
        if holder is not None and holder["writer"] != mine and not _holder_is_gone(
            holder["host"], holder["pid"], holder["pid_namespace"], holder["writer"]
        ):
            expired = time.time() - holder["heartbeat"] > holder["expire_after"]
            if not expired:
                raise RunLeaseError(
                    f"{self._describe_holder(run_id, holder)}. Another process is writing this run (a requeued "
                    "job while the old one still runs?): stop that process, or wait until its lease expired and "
                    "take the run over with takeover=True"
                )
            if not takeover:
                raise RunLeaseError(
                    f"{self._describe_holder(run_id, holder)}: the lease has expired. If that process is gone "
                    "(or must be fenced out), take the run over with takeover=True; its next write will then fail "
                    "and write nothing"
                )
        writer = self._take(conn, run_id, expire_after)
        self._leases[run_id] = writer
        self._last_beat[run_id] = time.time()
        _LIVE_WRITERS[writer] = self
        return writer

    def _check_lease(self, conn: sqlite3.Connection, run_id: int) -> None:
        """Inside a write transaction for `run_id`: this object still holds the run's lease (its
        heartbeat is refreshed), or takes a free lease; another writer's lease refuses the write."""
        mine = self._leases.get(run_id)
        if mine is None:
            self._claim(conn, run_id, takeover=False, expire_after=DEFAULT_LEASE_EXPIRY)
            return
        holder = self._lease_row(conn, run_id)
        if holder is None or holder["writer"] != mine:
            # The writer id stays: every later write of this object keeps failing the same way
            # (until an explicit acquire_lease), rather than quietly re-taking a free lease.
            taken = f"; {self._describe_holder(run_id, holder)}" if holder is not None else "; the lease was released"
            raise LeaseLostError(
                f"this writer ({mine}) lost its lease on run {run_id} of {self.path}{taken}. Another process took "
                "the run over: nothing was written; stop this training (its rows would mix with the new writer's)"
            )
        now = time.time()
        if now - self._last_beat.get(run_id, 0.0) >= _HEARTBEAT_EVERY:  # one page write a second at most
            conn.execute("UPDATE leases SET heartbeat=? WHERE run_id=?", (now, run_id))
            self._last_beat[run_id] = now

    def acquire_lease(self, run: int | str, *, takeover: bool = False, expire_after: float = DEFAULT_LEASE_EXPIRY) -> str:
        """Takes the run's lease for this store object and returns the writer id (a fresh uuid).

        Raises:
            RunLeaseError: another writer holds the lease and its heartbeat is younger than its
                `expire_after` (the message names it: writer id, host, pid, last heartbeat); or
                it expired and `takeover` is False. A holder on this host whose process has
                ended (a killed job) does not count: its lease is free.

        With ``takeover=True`` an expired lease becomes this writer's; the old writer's next write
        raises `LeaseLostError` and writes nothing. Every write this object makes for the run
        checks the lease in its own transaction and refreshes the heartbeat.
        """
        run_id = self.run_id(run)
        if expire_after <= 0:
            raise StoreError(f"expire_after must be positive, got {expire_after}")
        with self._write() as conn:
            return self._claim(conn, run_id, takeover=takeover, expire_after=expire_after)

    def release_lease(self, run: int | str) -> None:
        """Gives up this object's lease on the run (idempotent; a lost lease is left alone)."""
        run_id = self.run_id(run) if not isinstance(run, int) else run
        writer = self._leases.pop(run_id, None)
        if writer is None:
            return
        _LIVE_WRITERS.pop(writer, None)
        if self.readonly or self._conn is None:
            return
        with self._write() as conn:
            conn.execute("DELETE FROM leases WHERE run_id=? AND writer=?", (run_id, writer))

    def heartbeat(self, run: int | str) -> None:
        """Refreshes this writer's lease (for long stretches without writes); raises LeaseLostError."""
        run_id = self.run_id(run)
        with self._write() as conn:
            self._check_lease(conn, run_id)

    def lease(self, run: int | str) -> dict[str, Any] | None:
        """The run's lease holder (writer, host, pid, acquired_at, heartbeat as ISO text,
        expire_after, expired), or None when nobody holds it."""
        run_id = self.run_id(run)
        if not self._has_table("leases"):
            return None
        with self._lock:
            holder = self._lease_row(self.conn, run_id)
        if holder is None:
            return None
        holder["expired"] = time.time() - holder["heartbeat"] > holder["expire_after"]
        holder["heartbeat"] = _iso(holder["heartbeat"])
        return holder

    # ---- writing (used by the Recorder) -----------------------------------------------------
    def ensure_columns(self, table: str, names: Iterable[str]) -> None:
        """Adds REAL columns `names` to `table` where missing (figures new to this store)."""
        if table not in _RUN_TABLES:
            raise StoreError(f"unknown table {table!r}")
        names = list(names)
        existing = set(self.columns(table))
        if all(n in existing for n in names):
            return
        with self._write() as conn:
            self._add_missing_columns(conn, table, names)

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
        hyperparameter_columns: Sequence[str] | None = None,
        expire_after: float = DEFAULT_LEASE_EXPIRY,
    ) -> int:
        """Adds a run (status 'running'), takes its lease for this object, and returns its id.

        `hyperparameter_columns` names the per-row hyperparameter columns the run will write
        (lr, weight_decay, beta1, ... or momentum, dampening, ...); when not given they are
        recorded from the first write.
        """
        if not isinstance(name, str) or not name:
            raise StoreError(f"a run name must be a non-empty string, got {name!r}")
        parent = self.run_id(parent_run) if parent_run is not None else None
        if branch_epoch is not None and parent is None:
            raise StoreError("branch_epoch given without a parent_run")
        hyper_cols = None
        if hyperparameter_columns is not None:
            hyper_cols = json.dumps([str(c) for c in dict.fromkeys(hyperparameter_columns)])
            for c in json.loads(hyper_cols):
                _quote(c)
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO runs(name, started_at, updated_at, status, seed, code_version, package_version, optimizer,"
                " hyperparameters, optimizer_config, parent_run, branch_epoch, branch_step, num_groups,"
                " hyperparameter_columns) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name, utc_now(), utc_now(), seed, code_version, package_version, optimizer,
                    json.dumps(to_jsonable(dict(hyperparameters or {})), sort_keys=True),
                    json.dumps(to_jsonable(optimizer_config if optimizer_config is not None else [])),
                    parent, branch_epoch, branch_step, num_groups, hyper_cols,
                ),
            )
            run_id = int(cur.lastrowid)
            self._claim(conn, run_id, takeover=False, expire_after=expire_after)
            return run_id

    def set_status(self, run: int | str, status: str, *, detail: str | None = None) -> None:
        """Marks a run running, finished, failed or diverged; `detail` says more (for 'diverged':
        where, e.g. the first non-finite step/epoch and what was non-finite)."""
        if status not in RUN_STATUSES:
            raise StoreError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        run_id = self.run_id(run)
        finished = utc_now() if status != "running" else None
        with self._write() as conn:
            self._check_lease(conn, run_id)
            conn.execute(
                "UPDATE runs SET status=?, status_detail=?, finished_at=?, updated_at=? WHERE run_id=?",
                (status, detail, finished, utc_now(), run_id),
            )

    def set_num_groups(self, run: int | str, num_groups: int) -> None:
        """Updates the run's number of param groups (after ``add_param_group`` mid-run)."""
        run_id = self.run_id(run)
        with self._write() as conn:
            self._check_lease(conn, run_id)
            conn.execute("UPDATE runs SET num_groups=?, updated_at=? WHERE run_id=?", (int(num_groups), utc_now(), run_id))

    def _note_hyperparameters(self, conn: sqlite3.Connection, run_id: int, columns: Iterable[str], declared: Sequence[str] | None) -> None:
        """Records the run's hyperparameter columns (first write), or adds new ones to the record."""
        names = list(declared) if declared is not None else [c for c in columns if c in KNOWN_HYPERPARAMETERS]
        noted = self._hyper_noted.setdefault(run_id, set())
        if not names or noted.issuperset(names):
            return
        row = conn.execute("SELECT hyperparameter_columns FROM runs WHERE run_id=?", (run_id,)).fetchone()
        have = json.loads(row[0]) if row and row[0] else []
        merged = list(dict.fromkeys([*have, *names]))
        if merged != have:
            conn.execute("UPDATE runs SET hyperparameter_columns=? WHERE run_id=?", (json.dumps(merged), run_id))
        noted.update(merged)  # (a rolled-back write clears the cache: see _write)

    def write_steps(
        self,
        run_id: int,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        group_rows: Sequence[Sequence[Any]] = (),
        *,
        hyperparameters: Sequence[str] | None = None,
    ) -> None:
        """Appends step rows (columns after run_id) and per-group rows (`columns` with grp after step).

        One transaction; a step already present is an error (a resumed run truncates first).
        Columns the tables lack are created (REAL); `hyperparameters` names which of `columns`
        are hyperparameters (default: those in `KNOWN_HYPERPARAMETERS`), recorded for the run.
        """
        cols = ["run_id", *columns]
        gcols = ["run_id", columns[0], "grp", *columns[1:]]
        with self._write() as conn:
            self._check_lease(conn, run_id)
            self._add_missing_columns(conn, "steps", columns)
            self._add_missing_columns(conn, "step_groups", columns)  # group 0 of single-group runs is read from steps
            self._note_hyperparameters(conn, run_id, columns, hyperparameters)
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
        *,
        hyperparameters: Sequence[str] | None = None,
    ) -> None:
        """Writes one epoch row, its per-layer rows and its metrics in one transaction (columns
        the tables lack are created, as in `write_steps`)."""
        epoch = int(row["epoch"])
        cols = ["run_id", *row.keys()]
        lcols = ["run_id", "epoch", *layer_columns]
        with self._write() as conn:
            self._check_lease(conn, run_id)
            self._add_missing_columns(conn, "epochs", row.keys())
            self._note_hyperparameters(conn, run_id, row.keys(), hyperparameters)
            conn.execute(
                f"INSERT INTO epochs({', '.join(map(_quote, cols))}) VALUES ({', '.join('?' * len(cols))})",
                (run_id, *map(_clean, row.values())),
            )
            if layer_rows:
                self._add_missing_columns(conn, "layer_epochs", [c for c in layer_columns if c not in ("layer_index", "layer", "grp", "numel")])
                conn.executemany(
                    f"INSERT INTO layer_epochs({', '.join(map(_quote, lcols))}) VALUES ({', '.join('?' * len(lcols))})",
                    [(run_id, epoch, *map(_clean, r)) for r in layer_rows],
                )
            self._insert_metrics(conn, run_id, epoch, metrics or {})
            conn.execute("UPDATE runs SET updated_at=? WHERE run_id=?", (utc_now(), run_id))

    def write_metrics(self, run_id: int, epoch: int, metrics: Mapping[str, float], *, step: int | None = None) -> None:
        """Adds metrics of one epoch (an epoch already recorded, e.g. a late validation).

        `step` is the writer's step count when the metric was logged: `truncate_run` deletes
        late metrics logged beyond the position it truncates to, so that a resumed run can log
        them again.
        """
        with self._write() as conn:
            self._check_lease(conn, run_id)
            self._insert_metrics(conn, run_id, epoch, metrics, step)

    def _insert_metrics(self, conn: sqlite3.Connection, run_id: int, epoch: int, metrics: Mapping[str, float],
                        step: int | None = None) -> None:
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
        seq = conn.execute("SELECT COALESCE(max(seq), 0) FROM metrics").fetchone()[0]
        conn.executemany(
            "INSERT INTO metrics(run_id, epoch, name, value, step, seq) VALUES (?, ?, ?, ?, ?, ?)",
            [(run_id, epoch, k, float(v), step, seq + i + 1) for i, (k, v) in enumerate(metrics.items())],
        )

    # ---- step histograms (histogram_every) --------------------------------------------------
    def _create_histograms_table(self, conn: sqlite3.Connection) -> None:
        """Creates the histograms table in a store that lacks it (inside a write transaction)."""
        conn.execute(_HISTOGRAMS_TABLE)
        self._histograms_ready = True

    def write_histograms(self, run_id: int, rows: Iterable[tuple[int, int, int, str, str, Sequence[int]]]) -> int:
        """Adds step histograms: rows of (step, epoch, layer_index, layer, kind, counts).

        `counts` are one histogram's per-bin counts (HISTOGRAM_BINS of them); they are stored from
        the first to the last non-zero bin (an all-zero histogram, of a tensor without a gradient,
        is not stored). Returns the number of rows written.
        """
        records = []
        for step, epoch, layer_index, layer, kind, counts in rows:
            values = [int(c) for c in counts]
            nonzero = [i for i, c in enumerate(values) if c]
            if not nonzero:
                continue
            first, last = nonzero[0], nonzero[-1]
            records.append((run_id, int(step), int(epoch), int(layer_index), str(layer), str(kind), first,
                            json.dumps(values[first : last + 1])))
        with self._write() as conn:
            self._check_lease(conn, run_id)
            conn.executemany(
                "INSERT OR REPLACE INTO histograms(run_id, step, epoch, layer_index, layer, kind, first_bin, counts) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                records,
            )
        return len(records)

    def histograms(self, run: int | str | None = None, *, kind: str | None = None, num_bins: int = 258) -> pd.DataFrame:
        """Step histograms: run_id, step, epoch, layer_index, layer, kind, counts (a numpy int64
        array of `num_bins` per-bin counts). Empty for stores without any."""
        columns = ["run_id", "step", "epoch", "layer_index", "layer", "kind", "counts"]
        if not self._has_table("histograms"):
            return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
        where, params = self._where(run)
        if kind is not None:
            where, params = (where + (" AND" if where else " WHERE") + " kind=?"), (*params, kind)
        df = self._query(
            "SELECT run_id, step, epoch, layer_index, layer, kind, first_bin, counts FROM histograms"
            f"{where} ORDER BY run_id, step, layer_index, kind", params)

        def dense(first: int, counts: str) -> np.ndarray:
            out = np.zeros(num_bins, dtype=np.int64)
            values = json.loads(counts)
            out[first : first + len(values)] = values
            return out

        df["counts"] = [dense(int(f), c) for f, c in zip(df["first_bin"], df["counts"])]
        return df[columns]

    def record_checkpoint(self, run_id: int, step: int, epochs_done: int, path: str | Path) -> None:
        """Notes that a checkpoint of `run_id` after `step` steps and `epochs_done` epochs is at `path`."""
        with self._write() as conn:
            self._check_lease(conn, run_id)
            conn.execute(
                "INSERT OR REPLACE INTO checkpoints(run_id, step, epochs_done, path, saved_at) VALUES (?, ?, ?, ?, ?)",
                (run_id, step, epochs_done, str(Path(path).resolve()), utc_now()),
            )

    def truncate_run(self, run_id: int, *, step: int, epoch: int, status: str = "running",
                     position: Mapping[str, Any] | None = None) -> dict[str, int]:
        """Deletes the run's rows beyond a position, in one transaction, and sets its status.

        Rows of steps > `step` go (steps, step groups, checkpoints), and epoch-level rows
        (epochs, layers, metrics) of epochs >= `epoch` (`epoch` is the number of epochs completed
        at that position), and gaps marked beyond it. Late metrics of earlier epochs go too when
        they were logged beyond the position: at a step > `step`, or, given the checkpoint's
        `position` (from `RunStore.position`), written after it (this also catches a metric logged
        after the checkpoint at the same step). Returns the number of rows deleted per table.
        """
        deleted = {}
        with self._write() as conn:
            self._check_lease(conn, run_id)
            for table, column in _RUN_TABLES.items():
                bound = step if column == "step" else epoch
                op = ">" if column == "step" else ">="
                cur = conn.execute(f"DELETE FROM {table} WHERE run_id=? AND {column} {op} ?", (run_id, bound))
                deleted[table] = cur.rowcount
            late = conn.execute("DELETE FROM metrics WHERE run_id=? AND step > ?", (run_id, step)).rowcount
            metrics_seq = (position or {}).get("metrics_seq", -1)
            if metrics_seq != -1:
                late += conn.execute("DELETE FROM metrics WHERE run_id=? AND seq > ?", (run_id, metrics_seq or 0)).rowcount
            deleted["metrics"] += late
            conn.execute("DELETE FROM gaps WHERE run_id=? AND COALESCE(from_step, -1) > ?", (run_id, step))
            for table, column in _OPTIONAL_RUN_TABLES.items():
                if self._has_table(table):
                    deleted[table] = conn.execute(f"DELETE FROM {table} WHERE run_id=? AND {column} >= ?",
                                                  (run_id, epoch)).rowcount
            conn.execute(
                "UPDATE runs SET status=?, status_detail=NULL, finished_at=NULL, updated_at=? WHERE run_id=?",
                (status, utc_now(), run_id),
            )
        return deleted

    def delete_run(self, run: int | str) -> None:
        """Deletes a run and all its rows (refused while branches of it exist, or while another
        writer holds its lease)."""
        run_id = self.run_id(run)
        with self._write() as conn:
            children = [r[0] for r in conn.execute("SELECT run_id FROM runs WHERE parent_run=?", (run_id,))]
            if children:
                raise StoreError(f"run {run_id} has branches {children}: delete them first")
            self._check_lease(conn, run_id)
            for table in (*_RUN_TABLES, "gaps", "leases"):
                conn.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))
            for table in _OPTIONAL_RUN_TABLES:
                if self._has_table(table):
                    conn.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))
            conn.execute("DELETE FROM runs WHERE run_id=?", (run_id,))
        writer = self._leases.pop(run_id, None)
        if writer is not None:
            _LIVE_WRITERS.pop(writer, None)

    # ---- durability and positions (checkpoints refer to the store) -------------------------
    def sync(self) -> dict[str, int]:
        """Makes everything committed so far durable, against a power cut as well as a crash.

        Runs a full WAL checkpoint with ``synchronous=FULL`` for that moment (the WAL is synced,
        copied into the database file, and the file synced), then fsyncs the -wal file itself in
        case readers kept the checkpoint from completing. The recorder calls it after its last
        flush and before it writes a checkpoint file. Returns SQLite's checkpoint counters
        (busy, wal_frames, checkpointed_frames).
        """
        if self.readonly:
            raise StoreError(f"the run store {self.path} was opened read-only")
        with self._lock:
            conn = self.conn
            conn.execute("PRAGMA synchronous=FULL")
            try:
                busy, log, done = conn.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
            finally:
                conn.execute("PRAGMA synchronous=NORMAL")
            for suffix in ("-wal", ""):
                try:
                    fd = os.open(f"{self.path}{suffix}", os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return {"busy": int(busy), "wal_frames": int(log), "checkpointed_frames": int(done)}

    def _position_counts(self, conn: sqlite3.Connection, run_id: int, last_step: int | None, last_epoch: int | None,
                         metrics_seq: int | None = None) -> tuple[dict[str, int], str]:
        """Row counts and a digest of the row keys of a run, within (step <= last_step,
        epoch <= last_epoch, and for metrics seq <= metrics_seq when given: a metric logged after
        the checkpoint, at its epoch, is beyond the position): one indexed aggregate per table, no
        row read into Python."""
        step_bound = last_step if last_step is not None else -1
        epoch_bound = last_epoch if last_epoch is not None else -1
        metrics_filter = " AND seq<=?" if metrics_seq is not None and self._version >= 2 else ""
        queries = {
            "steps": ("SELECT count(*), COALESCE(sum(step), 0), COALESCE(sum(epoch), 0) FROM steps WHERE run_id=? AND step<=?", step_bound),
            "step_groups": ("SELECT count(*), COALESCE(sum(step), 0), COALESCE(sum(grp), 0) FROM step_groups WHERE run_id=? AND step<=?", step_bound),
            "epochs": ("SELECT count(*), COALESCE(sum(epoch), 0), COALESCE(sum(step), 0) FROM epochs WHERE run_id=? AND epoch<=?", epoch_bound),
            "layer_epochs": ("SELECT count(*), COALESCE(sum(epoch), 0), COALESCE(sum(layer_index), 0) FROM layer_epochs WHERE run_id=? AND epoch<=?", epoch_bound),
            "metrics": ("SELECT count(*), COALESCE(sum(epoch), 0), COALESCE(sum(length(name)), 0) FROM metrics WHERE run_id=? AND epoch<=?" + metrics_filter, epoch_bound),
        }
        counts, digest = {}, hashlib.sha256()
        for table, (sql, bound) in queries.items():
            args = (run_id, bound, metrics_seq) if table == "metrics" and metrics_filter else (run_id, bound)
            row = conn.execute(sql, args).fetchone()
            counts[table] = int(row[0])
            digest.update(f"{table}:{row[0]}:{row[1]}:{row[2]};".encode())
        return counts, digest.hexdigest()

    def position(self, run: int | str) -> dict[str, Any]:
        """What the store holds of a run now, for a checkpoint to record (JSON-able).

        Keys: run_id, last_step and last_epoch (None when no row), rows (row counts of steps,
        step_groups, epochs, layer_epochs, metrics), digest (a sha256 of the tables' key counts
        and sums) and metrics_seq (the order of the run's last metric write, for `truncate_run`).
        `verify_position` checks a store against it at resume.
        """
        run_id = self.run_id(run)
        with self._snapshot() as conn:
            last_step = conn.execute("SELECT max(step) FROM steps WHERE run_id=?", (run_id,)).fetchone()[0]
            last_epoch = conn.execute("SELECT max(epoch) FROM epochs WHERE run_id=?", (run_id,)).fetchone()[0]
            metrics_seq = None
            if self._version >= 2:
                metrics_seq = conn.execute("SELECT max(seq) FROM metrics WHERE run_id=?", (run_id,)).fetchone()[0]
            # (on a v2 store: no metric yet is seq 0, as truncate_run reads it)
            counts, digest = self._position_counts(conn, run_id, last_step, last_epoch,
                                                   (metrics_seq or 0) if self._version >= 2 else None)
        return {"run_id": run_id, "last_step": last_step, "last_epoch": last_epoch, "rows": counts, "digest": digest,
                "metrics_seq": metrics_seq}

    def verify_position(self, run: int | str, position: Mapping[str, Any], *, option: str = "allow_gap=True") -> None:
        """Checks that the store still holds every row a checkpoint's `position` had.

        Rows beyond the position (written after the checkpoint) do not matter: resume deletes
        them. Raises StoreGapError saying what the checkpoint expects, what the store holds and
        the way out (`option`, the resume option that accepts the gap and marks it with
        `mark_gap`) when rows are missing or differ: an older copy of the store, or transactions
        lost to a power cut.
        """
        run_id = self.run_id(run)
        last_step, last_epoch = position.get("last_step"), position.get("last_epoch")
        with self._snapshot() as conn:
            seq = position.get("metrics_seq", -1)  # absent (-1): a checkpoint older than metrics.seq
            counts, digest = self._position_counts(conn, run_id, last_step, last_epoch, None if seq == -1 else (seq or 0))
            have_step = conn.execute("SELECT max(step) FROM steps WHERE run_id=? AND step<=?", (run_id, last_step if last_step is not None else -1)).fetchone()[0]
            have_epoch = conn.execute("SELECT max(epoch) FROM epochs WHERE run_id=? AND epoch<=?", (run_id, last_epoch if last_epoch is not None else -1)).fetchone()[0]
        if digest == position.get("digest"):
            return
        expected = position.get("rows", {})
        missing = {t: expected.get(t, 0) - counts.get(t, 0) for t in _POSITION_TABLES if expected.get(t, 0) > counts.get(t, 0)}
        what = ", ".join(f"{n} {t} rows" for t, n in missing.items()) if missing else "rows that differ from the checkpoint's"
        raise StoreGapError(
            f"run {run_id} of {self.path} lacks {what}: the checkpoint expects steps up to {last_step} and epochs up "
            f"to {last_epoch} ({dict(expected)}), the store holds steps up to {have_step} and epochs up to "
            f"{have_epoch} ({counts}) there. The store is an older copy, or lost its last transactions (a power cut). "
            f"Resume with the store the checkpoint was written with, or pass {option} to re-derive what can be and "
            "mark the gap in the store"
        )

    def mark_gap(
        self,
        run: int | str,
        *,
        from_step: int | None,
        to_step: int | None,
        from_epoch: int | None,
        to_epoch: int | None,
        reason: str,
    ) -> None:
        """Records that the run has no rows for steps from_step..to_step and epochs
        from_epoch..to_epoch (inclusive), and why; `gaps` shows them."""
        run_id = self.run_id(run)
        with self._write() as conn:
            self._check_lease(conn, run_id)
            conn.execute(
                "INSERT INTO gaps(run_id, from_step, to_step, from_epoch, to_epoch, reason, marked_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, from_step, to_step, from_epoch, to_epoch, str(reason), utc_now()),
            )

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

    @staticmethod
    def _ordered(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
        """Key columns, then the hyperparameters (in `KNOWN_HYPERPARAMETERS` order), then the rest
        as stored: the layout of version 1 frames, whatever order columns were added in."""
        hyper = [c for c in KNOWN_HYPERPARAMETERS if c in df.columns]
        front = [c for c in keys if c in df.columns] + hyper
        return df[front + [c for c in df.columns if c not in front]]

    def _where(self, run: int | str | None) -> tuple[str, tuple]:
        if run is None:
            return "", ()
        return " WHERE run_id=?", (self.run_id(run),)

    def runs(self) -> pd.DataFrame:
        """One row per run: run_id, name, started_at, status, seed, code_version, parent_run,
        branch_epoch, hyperparameters (a dict), and the rest of the runs table (status_detail:
        why a run failed or diverged; hyperparameter_columns: a list)."""
        df = self._query("SELECT * FROM runs ORDER BY run_id")
        for col in ("hyperparameters", "optimizer_config"):
            df[col] = df[col].map(lambda s: json.loads(s) if isinstance(s, str) else s)
        if "status_detail" not in df.columns:  # a version 1 file, read before any write
            df["status_detail"] = None
        if "hyperparameter_columns" not in df.columns:
            df["hyperparameter_columns"] = None
        df["hyperparameter_columns"] = df["hyperparameter_columns"].map(
            lambda s: json.loads(s) if isinstance(s, str) else (list(HYPER_COLUMNS) if self._version < 2 else [])
        )
        for col in ("seed", "parent_run", "branch_epoch", "branch_step", "num_groups"):
            df[col] = df[col].astype("Int64")  # nullable: a root run has no parent
        first = ["run_id", "name", "started_at", "status", "seed", "code_version", "parent_run", "branch_epoch", "hyperparameters"]
        return df[first + [c for c in df.columns if c not in first]]

    def hyperparameter_columns(self, run: int | str) -> tuple[str, ...]:
        """The per-row hyperparameter columns the run has (lr, weight_decay, beta1, beta2, eps
        for Adam; lr, momentum, dampening, ... for SGD), as recorded at create time or first write.

        A run with none recorded yet (no rows) has the base columns (lr, weight_decay); runs of
        version 1 stores have Adam's.
        """
        run_id = self.run_id(run)
        if self._version < 2:
            return HYPER_COLUMNS
        with self._lock:
            row = self.conn.execute("SELECT hyperparameter_columns FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return tuple(json.loads(row[0])) if row and row[0] else BASE_HYPER_COLUMNS

    def gaps(self, run: int | str | None = None) -> pd.DataFrame:
        """Gaps marked in a run's rows (`mark_gap`): run_id, from_step, to_step, from_epoch,
        to_epoch, reason, marked_at. Empty for stores without any."""
        columns = ["run_id", "from_step", "to_step", "from_epoch", "to_epoch", "reason", "marked_at"]
        where, params = self._where(run)
        if not self._has_table("gaps"):
            return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
        df = self._query(f"SELECT {', '.join(columns)} FROM gaps{where} ORDER BY run_id, gap_id", params)
        for col in ("from_step", "to_step", "from_epoch", "to_epoch"):
            df[col] = df[col].astype("Int64")
        return df

    def steps(self, run: int | str | None = None) -> pd.DataFrame:
        """Per-step rows: run_id, step, epoch, lr, weight_decay, beta1, beta2, eps (group 0) and
        the overall step figures. All runs when `run` is None."""
        where, params = self._where(run)
        return self._ordered(self._query(f"SELECT * FROM steps{where} ORDER BY run_id, step", params, "steps"), ("run_id", "step", "epoch"))

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
        keys = ("run_id", "step", "grp", "epoch")
        if not frames:
            return self._ordered(multi, keys)
        both = pd.concat(frames, ignore_index=True).sort_values(["run_id", "step", "grp"], ignore_index=True)
        return self._ordered(both, keys)

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
        return self._ordered(df, ("run_id", "epoch", "step", "num_steps", "recorded_steps", "wall_time"))

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

    # ---- learning-rate rules' decisions (issue 14) -------------------------------------------
    def _ensure_optional_tables(self) -> None:
        """Creates the tables added within schema 2 (CREATE TABLE IF NOT EXISTS), when missing."""
        with self._lock:
            have = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = [t for t in _OPTIONAL_RUN_TABLES if t not in have]
        if missing:
            with self._write(migrate=False) as conn:
                for table in missing:
                    for statement in _OPTIONAL_TABLE_SQL[table].split(";"):
                        if statement.strip():
                            conn.execute(statement)

    def write_lr_decisions(self, run_id: int, decisions: Iterable[Mapping[str, Any]]) -> int:
        """Appends decisions of learning-rate rules (`core.lr_rules.Decision.to_dict()` rows).

        Each row needs rule, epoch, step, group, action, lr_before, lr_after, figure, value and
        may carry a JSON-able detail (e.g. a probe curve). Returns the number of rows written.
        """
        rows = list(decisions)
        if not rows:
            return 0
        if not self._has_table("lr_decisions"):
            self._ensure_optional_tables()
        with self._write() as conn:
            self._check_lease(conn, run_id)
            seq = conn.execute("SELECT COALESCE(max(seq), 0) FROM lr_decisions WHERE run_id=?", (run_id,)).fetchone()[0]
            conn.executemany(
                "INSERT INTO lr_decisions(run_id, seq, epoch, step, rule, grp, action, lr_before, lr_after, figure, "
                "value, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(run_id, seq + i + 1, int(d["epoch"]), int(d["step"]), str(d["rule"]), int(d.get("group", -1)),
                  str(d["action"]), _clean(float(d["lr_before"])), _clean(float(d["lr_after"])), str(d["figure"]),
                  _clean(float(d["value"])), json.dumps(to_jsonable(d.get("detail") or {})))
                 for i, d in enumerate(rows)],
            )
        return len(rows)

    def lr_decisions(self, run: int | str | None = None) -> pd.DataFrame:
        """Learning-rate rules' decisions: run_id, seq, epoch, step, rule, grp (-1: all groups),
        action, lr_before, lr_after, figure, value, detail (a dict). Empty without any."""
        columns = ["run_id", "seq", "epoch", "step", "rule", "grp", "action", "lr_before", "lr_after", "figure",
                   "value", "detail"]
        if not self._has_table("lr_decisions"):
            return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
        where, params = self._where(run)
        df = self._query(f"SELECT {', '.join(columns)} FROM lr_decisions{where} ORDER BY run_id, seq", params)
        df["detail"] = [json.loads(d) if isinstance(d, str) else {} for d in df["detail"]]
        for col in ("lr_before", "lr_after", "value"):
            df[col] = df[col].astype(float)
        return df

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` ('ok' when the file is sound)."""
        with self._lock:
            return "\n".join(r[0] for r in self.conn.execute("PRAGMA integrity_check"))

    # ---- studies: branch bookkeeping and shard merging (issue 13) ---------------------------
    # A study's workers each write their own store (a shard); only the driver writes the study's
    # store, merging a finished shard in one transaction. The study_branches table is created on
    # demand (CREATE TABLE IF NOT EXISTS) in any schema-2 store opened for writing: no version bump.
    _STUDY_BRANCHES = """
    CREATE TABLE IF NOT EXISTS study_branches (
        branch_id TEXT PRIMARY KEY,
        run_id INTEGER REFERENCES runs(run_id),
        parent_run INTEGER REFERENCES runs(run_id),
        branch_epoch INTEGER,
        seed INTEGER,
        spec TEXT NOT NULL,
        status TEXT NOT NULL,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        updated_at TEXT NOT NULL
    )"""
    #: Statuses of a study branch (its run, once merged, has the run statuses).
    STUDY_BRANCH_STATUSES = ("pending", "finished", "failed")

    def ensure_study_tables(self) -> None:
        """Creates the study_branches table where missing (an existing store gains it)."""
        if self._has_table("study_branches"):
            return
        with self._write() as conn:
            conn.execute(self._STUDY_BRANCHES)

    def study_branches(self) -> pd.DataFrame:
        """The branches of studies recorded in this store: branch_id (the spec's content hash),
        run_id (once merged), parent_run, branch_epoch, seed, spec (a dict), status ('pending',
        'finished', 'failed'), error, attempts, updated_at. Empty when no study wrote here."""
        columns = ["branch_id", "run_id", "parent_run", "branch_epoch", "seed", "spec", "status", "error", "attempts",
                   "updated_at"]
        if not self._has_table("study_branches"):
            return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
        df = self._query("SELECT * FROM study_branches ORDER BY rowid")
        df["spec"] = df["spec"].map(json.loads)
        for col in ("run_id", "parent_run", "branch_epoch", "seed"):
            df[col] = df[col].astype("Int64")
        return df[columns]

    def set_study_branch(self, branch_id: str, *, spec: Mapping[str, Any], status: str, parent_run: int | None = None,
                         branch_epoch: int | None = None, seed: int | None = None, error: str | None = None,
                         attempts: int = 0, run_id: int | None = None) -> None:
        """Records (or updates) one study branch's row."""
        if status not in self.STUDY_BRANCH_STATUSES:
            raise StoreError(f"a study branch's status is one of {self.STUDY_BRANCH_STATUSES}, got {status!r}")
        self.ensure_study_tables()
        with self._write() as conn:
            self._upsert_branch(conn, branch_id, spec, status, parent_run, branch_epoch, seed, error, attempts, run_id)

    @staticmethod
    def _upsert_branch(conn: sqlite3.Connection, branch_id: str, spec: Mapping[str, Any], status: str,
                       parent_run: int | None, branch_epoch: int | None, seed: int | None, error: str | None,
                       attempts: int, run_id: int | None) -> None:
        conn.execute(
            "INSERT INTO study_branches(branch_id, run_id, parent_run, branch_epoch, seed, spec, status, error, attempts,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(branch_id) DO UPDATE SET"
            " run_id=excluded.run_id, status=excluded.status, error=excluded.error, attempts=excluded.attempts,"
            " updated_at=excluded.updated_at",
            (branch_id, run_id, parent_run, branch_epoch, seed, json.dumps(to_jsonable(dict(spec)), sort_keys=True),
             status, error, int(attempts), utc_now()),
        )

    def run_header(self, run: int | str) -> dict[str, Any]:
        """A run's row of the runs table as stored (JSON columns as text), for `add_run_header`."""
        run_id = self.run_id(run)
        with self._lock:
            cur = self.conn.execute("SELECT * FROM runs WHERE run_id=?", (run_id,))
            return dict(zip([d[0] for d in cur.description], cur.fetchone()))

    def add_run_header(self, row: Mapping[str, Any]) -> int:
        """Adds a run's row (from `run_header`, keeping its run_id; status 'finished', no lineage,
        no rows). A branch's shard holds its parent this way, so that the branch records its
        lineage there; `merge_shard` maps that id back to the parent in the study's store."""
        values = {**row, "status": "finished", "parent_run": None, "branch_epoch": None, "branch_step": None}
        mine = set(self.columns("runs"))
        cols = [c for c in values if c in mine]
        with self._write() as conn:
            conn.execute(f"INSERT INTO runs({', '.join(map(_quote, cols))}) VALUES ({', '.join('?' * len(cols))})",
                         [values[c] for c in cols])
        return int(values["run_id"])

    def merge_shard(self, shard: str | Path, runs: Sequence[int], id_map: Mapping[int, int],
                    branch: Mapping[str, Any] | None = None) -> dict[int, int]:
        """Copies runs of another store (a worker's shard) with all their rows into this one, in
        one transaction with the study branch's row (`branch`: the keyword arguments of
        `set_study_branch`, with ``run_id`` set to the merged run).

        `runs` are the shard's run ids to copy (they get new ids here, in the order given);
        `id_map` maps the shard's other run ids (a parent's header) to runs of this store. Columns
        the shard has and this store lacks are added. Returns {shard run id: new run id}.
        """
        shard = Path(shard)
        if not shard.is_file():
            raise FileNotFoundError(f"no shard at {shard}")
        if branch is not None:
            self.ensure_study_tables()
        with self._lock:
            conn = self.conn
            conn.execute("ATTACH DATABASE ? AS shard", (f"{shard.resolve().as_uri()}?mode=ro",))
            try:
                with self._write() as conn:
                    return self._merge_attached(conn, list(runs), dict(id_map), branch)
            finally:
                conn.execute("DETACH DATABASE shard")

    def _merge_attached(self, conn: sqlite3.Connection, runs: list[int], id_map: dict[int, int],
                        branch: Mapping[str, Any] | None) -> dict[int, int]:
        def shard_columns(table: str) -> list[tuple[str, str]]:
            return [(r[1], r[2]) for r in conn.execute(f"PRAGMA shard.table_info({table})")]

        run_cols = [c for c, _ in shard_columns("runs") if c != "run_id"]
        mapping = dict(id_map)
        for old in runs:
            row = conn.execute(f"SELECT {', '.join(map(_quote, run_cols))} FROM shard.runs WHERE run_id=?", (old,)).fetchone()
            if row is None:
                raise UnknownRunError(f"no run {old} in the shard")
            values = dict(zip(run_cols, row))
            parent = values.get("parent_run")
            if parent is not None:
                if parent not in mapping:
                    raise StoreError(f"run {old} of the shard has parent {parent}, which is neither merged nor mapped")
                values["parent_run"] = mapping[parent]
            cur = conn.execute(f"INSERT INTO runs({', '.join(map(_quote, run_cols))}) VALUES ({', '.join('?' * len(run_cols))})",
                               list(values.values()))
            mapping[old] = int(cur.lastrowid)
        seq_offset = conn.execute("SELECT COALESCE(max(seq), 0) FROM main.metrics").fetchone()[0]
        for table in (*_RUN_TABLES, "gaps"):
            cols = [(c, kind) for c, kind in shard_columns(table) if c not in ("run_id", "gap_id")]
            mine = {r[1] for r in conn.execute(f"PRAGMA main.table_info({table})")}
            missing = [c for c, _ in cols if c not in mine]
            if missing:
                self._add_missing_columns(conn, table, missing)
            names = [c for c, _ in cols]
            select = ", ".join(f"seq + {int(seq_offset)}" if (table == "metrics" and c == "seq") else _quote(c) for c in names)
            for old in runs:
                conn.execute(
                    f"INSERT INTO main.{table}(run_id, {', '.join(map(_quote, names))}) SELECT ?, {select} "
                    f"FROM shard.{table} WHERE run_id=?",
                    (mapping[old], old),
                )
        if branch is not None:
            b = dict(branch)
            self._upsert_branch(conn, b["branch_id"], b["spec"], b["status"], b.get("parent_run"), b.get("branch_epoch"),
                                b.get("seed"), b.get("error"), b.get("attempts", 0),
                                mapping.get(b["run_id"]) if b.get("run_id") is not None else None)
        return {old: mapping[old] for old in runs}


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
    "CorruptStoreError",
    "HotJournalError",
    "ReadOnlyStoreError",
    "RunLeaseError",
    "LeaseLostError",
    "StoreGapError",
    "RUN_STATUSES",
    "KNOWN_HYPERPARAMETERS",
    "BASE_HYPER_COLUMNS",
    "SchemaVersionError",
    "UnknownRunError",
    "MetricClashError",
    "SCHEMA_VERSION",
    "APPLICATION_ID",
    "HYPER_COLUMNS",
    "wait_for_store",
]
