"""The telemetry recorder: per-step and per-epoch rows of an instrumented optimizer, into a RunStore.

    rec = Recorder(optimizer, "runs/exp.sqlite", run_name="baseline", model=model, seed=0)
    for epoch in range(epochs):
        for batch in loader:
            ...; loss.backward(); optimizer.step()     # step rows: captured by a step post-hook
        rec.end_epoch(train_loss=..., val_loss=...)    # epoch boundary + epoch/layer rows + metrics
        rec.save_checkpoint(f"ckpt/{epoch}.pt", model)
    rec.close()

How a step is captured without synchronising with the GPU: the optimizer's kernel leaves the
step's per-tensor sums in a small device buffer ([tensors, NUM_STATS] float64). The post-hook
copies that buffer into the next slot of a preallocated device ring — one device-to-device copy,
no Python loop over tensors, nothing read back — and notes the step number and the (host-side)
hyperparameters in force. Every `flush_every` steps (and at epoch ends, checkpoints and close)
the ring is reduced on the device in one batched pass (the same `StepStatistics.derived` code the
optimizer uses, applied to all buffered steps at once), copied out non-blocking into pinned
memory, and written to the store once the copy has landed (an event is polled, not waited on,
except at epoch ends where the epoch's rows are needed anyway). On CPU the same code runs and the
copy is immediate.

Step rows hold the overall figures (and, with several param groups, per-group rows); epoch rows
hold the epoch geometry, the mean/min/max of the epoch's recorded step figures (NaN steps are
skipped, as pandas does) and the user metrics; layer rows hold the epoch geometry and the
epoch's last step's figures per tensor.
"""

from __future__ import annotations

import collections
import math
import re
import sqlite3
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    atomic_save,
    check_model,
    load_checkpoint,
    model_fingerprint,
    rng_state,
    seed_everything,
    set_rng_state,
)
from ..core.figures import aggregate_names
from ..core.stats import EPOCH_FIGURES as _EPOCH_FIGURES
from ..core.stats import STEP_FIGURES as _STEP_FIGURES
from ..core.stats import EpochGeometry, StepStatistics
from .store import HYPER_COLUMNS, MetricClashError, RunStore, StoreError


#: The per-step figures recorded (keys of `StepStatistics.derived`), in column order.
#: EPOCH_FIGURES: the epoch geometry (keys of `EpochGeometry.derived`). Both come from the
#: declarations in core.figures over this build's statistics tables.
STEP_FIGURES: tuple[str, ...] = tuple(f.name for f in _STEP_FIGURES)
EPOCH_FIGURES: tuple[str, ...] = tuple(f.name for f in _EPOCH_FIGURES)
#: The epoch aggregates of the step figures: f_mean, f_min, f_max for each step figure f.
AGGREGATES: tuple[str, ...] = aggregate_names(STEP_FIGURES)
#: Columns of an epoch row besides figures (run_id is added by the store).
EPOCH_BASE_COLUMNS: tuple[str, ...] = ("epoch", "step", "num_steps", "recorded_steps", "wall_time", *HYPER_COLUMNS)
#: Columns of a layer row after run_id and epoch.
LAYER_COLUMNS: tuple[str, ...] = ("layer_index", "layer", "grp", "numel", *EPOCH_FIGURES, *STEP_FIGURES)

_METRIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-/]*$")
_RESERVED_METRICS = frozenset(
    {"run_id", "name", "value", "layer", "layer_index", "grp", "numel", *EPOCH_BASE_COLUMNS, *EPOCH_FIGURES, *STEP_FIGURES, *AGGREGATES}
)

# Device ring memory cap: beyond it the ring holds fewer steps and flushes more often.
_RING_BYTES = 64 << 20


def code_version() -> str:
    """`git describe --always --dirty --tags` of the working directory, else the package version."""
    from .. import __version__

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"], capture_output=True, text=True, timeout=5, check=False
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"instrumented_adam {__version__}"


class _TensorHyper(tuple):
    """Hyperparameters of a group of which some are (cloned) tensors: marks the rare case cheaply."""


def _group_hyper(group: Mapping[str, Any]) -> tuple[Any, ...]:
    """(lr, weight_decay, beta1, beta2, eps) of a param group; tensor values are cloned (device op)."""
    lr = group["lr"]
    beta1, beta2 = group.get("betas", (math.nan, math.nan))
    values = (lr, group.get("weight_decay", 0.0), beta1, beta2, group.get("eps", math.nan))
    # Runs every step: plain type checks on the three entries torch allows to be tensors.
    if isinstance(lr, Tensor) or isinstance(beta1, Tensor) or isinstance(beta2, Tensor):
        return _TensorHyper(v.detach().clone() if isinstance(v, Tensor) else v for v in values)  # this step's value
    return values


def _host_hyper(hp: tuple[Any, ...]) -> tuple[float, ...]:
    """Hyperparameters as floats (reads device tensors: only where a sync is fine)."""
    return tuple(float(v) for v in hp)


@dataclass
class _Pending:
    """A flushed block of steps whose figures are on their way to the host."""

    host: Tensor  # payload: overall [n, F], then per-group [n*G, F] when G > 1, then tensor hyperparameters
    event: Any  # torch.cuda.Event, or None when the payload is already on the host
    meta: list[tuple[int, int, tuple[tuple[Any, ...], ...]]]  # (step, epoch, hyperparameters per group)
    num_groups: int
    tensor_hyper: bool  # some hyperparameters were tensors: their values follow the figures


class Recorder:
    """Records an instrumented optimizer's steps and epochs into a `RunStore`.

    Args:
        optimizer: an instrumented_adam optimizer (Adam, AdamW, Adamax) with statistics on.
        store: a `RunStore` or the path of its SQLite file (created if missing).
        run_name: the run's name (default: ``run-<UTC time>``); names need not be unique, a
            name given to the store's loaders means the latest run of that name.
        model: the model, to name layers from ``named_parameters()`` (else ``param.<i>``) and
            as the default model of `save_checkpoint`.
        hyperparameters: stored as JSON with the run (default: the optimizer's group-0 settings).
        seed: the seed of the run, stored with it (the recorder does not seed anything).
        step_every: record every N-th optimizer step (step numbers divisible by N).
        flush_every: move buffered step rows to the store every this many steps (at most).
        parent_run, branch_epoch: lineage of a branch (run id or name, and the epoch it starts from).
        code_version: stored with the run (default: ``git describe`` of the cwd, else the package version).
        tensorboard: a log directory to mirror the rows into as TensorBoard events while training.

    The step capture is a post-hook on ``optimizer.step``: the training loop needs no per-step
    code. Call `end_epoch` once per epoch (it calls ``optimizer.end_epoch()`` itself) and
    `close` at the end. Rows are written only once flushed: a crash loses at most the steps
    since the last flush, never the file.
    """

    # ---- construction -----------------------------------------------------------------------
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        store: RunStore | str | Path,
        run_name: str | None = None,
        *,
        model: torch.nn.Module | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        seed: int | None = None,
        step_every: int = 1,
        flush_every: int = 100,
        parent_run: int | str | None = None,
        branch_epoch: int | None = None,
        code_version: str | None = None,
        tensorboard: str | Path | None = None,
    ) -> None:
        self._setup(optimizer, store, model, step_every, flush_every, tensorboard)
        try:
            self.run_id = self._create_run(run_name, hyperparameters, seed, parent_run, branch_epoch, code_version)
        except BaseException:
            self._release_store()
            raise
        self._attach()

    def _setup(
        self,
        optimizer: torch.optim.Optimizer,
        store: RunStore | str | Path,
        model: torch.nn.Module | None,
        step_every: int,
        flush_every: int,
        tensorboard: str | Path | None,
    ) -> None:
        if not (hasattr(optimizer, "last_step_statistics") and hasattr(optimizer, "steps_done")):
            raise TypeError(
                f"Recorder needs an instrumented_adam optimizer (Adam, AdamW, Adamax), got {type(optimizer).__name__}"
            )
        if not getattr(optimizer, "statistics", False):
            raise ValueError("Recorder needs an optimizer built with statistics=True")
        if int(step_every) < 1 or int(flush_every) < 1:
            raise ValueError(f"step_every and flush_every must be >= 1, got {step_every} and {flush_every}")
        self.optimizer = optimizer
        self.model = model
        self.step_every = int(step_every)
        self.flush_every = int(flush_every)
        self._owns_store = not isinstance(store, RunStore)
        self.store = RunStore(store, create=True) if self._owns_store else store
        self.run_id: int = -1
        self.run_name: str = ""
        self._handle = None
        self._closed = False
        self._step_offset = 0  # recorded step = optimizer.steps_done + offset (branches without optimizer state)
        self._epoch = int(getattr(optimizer, "epochs_done", 0))  # the epoch in progress
        self._epoch_start_step = int(optimizer.steps_done)
        self._epoch_figures: list[np.ndarray] = []  # overall figures of this epoch's recorded steps
        self._staged_metrics: dict[str, float] = {}
        self._last_hyper: tuple[tuple[Any, ...], ...] | None = None
        # Device ring: raw per-tensor sums of the buffered steps.
        self._ring: Tensor | None = None
        self._context: tuple | None = None  # numel, groups, num_groups, prev_step_sumsq of the buffered rows
        self._fill = 0
        self._meta: list[tuple[int, int, tuple[tuple[Any, ...], ...]]] = []
        self._pending: collections.deque[_Pending] = collections.deque()
        self._tb = None
        try:
            # Figure columns come from the stats code: a store made by an older version gains the new ones.
            self.store.ensure_columns("steps", STEP_FIGURES)
            self.store.ensure_columns("step_groups", STEP_FIGURES)
            self.store.ensure_columns("epochs", (*EPOCH_FIGURES, *AGGREGATES))
            self.store.ensure_columns("layer_epochs", (*EPOCH_FIGURES, *STEP_FIGURES))
            if tensorboard is not None:
                from .export import TensorBoardLogger

                self._tb = TensorBoardLogger(
                    tensorboard, optimizer_name=type(optimizer).__name__, num_groups=len(optimizer.param_groups)
                )
        except BaseException:
            self._release_store()
            raise

    def _create_run(
        self,
        run_name: str | None,
        hyperparameters: Mapping[str, Any] | None,
        seed: int | None,
        parent_run: int | str | None,
        branch_epoch: int | None,
        version: str | None,
        branch_step: int | None = None,
    ) -> int:
        from .. import __version__

        opt = self.optimizer
        config = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        if hyperparameters is None:
            hyperparameters = {"optimizer": type(opt).__name__, **config[0]} if config else {}
        self.run_name = run_name or f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        return self.store.create_run(
            self.run_name,
            hyperparameters=hyperparameters,
            seed=seed,
            code_version=version if version is not None else code_version(),
            package_version=__version__,
            optimizer=type(opt).__name__,
            optimizer_config=config,
            parent_run=parent_run,
            branch_epoch=branch_epoch,
            branch_step=branch_step,
            num_groups=len(opt.param_groups),
        )

    def _attach(self) -> None:
        self._handle = self.optimizer.register_step_post_hook(self._on_step)

    # ---- the per-step hot path --------------------------------------------------------------
    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Step post-hook: one device op (the optimizer's live statistics buffer copied into the
        ring) and host bookkeeping; no sync, no loop over tensors.

        Runs every step, so it is written for speed: no grad-mode context (nothing here is
        differentiable), identity checks only.
        """
        step = optimizer.steps_done + self._step_offset
        hyper = tuple([_group_hyper(g) for g in optimizer.param_groups])  # a loop over groups (few), not tensors
        self._last_hyper = hyper
        if step % self.step_every:
            return
        stats = optimizer.last_step_statistics(copy=False)  # copied into the ring just below
        # The per-row element counts, group index and ‖s_{k-1}‖² change rarely (a parameter gains
        # or loses its gradient, an epoch ends, a group is added): the optimizer then hands out
        # new tensors, so comparing identities (free) tells when the buffered rows must be
        # derived with the old ones first.
        context = self._context
        if (
            context is None
            or stats.numel is not context[0]
            or stats.groups is not context[1]
            or stats.prev_step_sumsq is not context[3]
        ):
            self._new_context(stats, (stats.numel, stats.groups, stats.num_groups, stats.prev_step_sumsq))
        self._ring[self._fill].copy_(stats.values)
        self._meta.append((step, self._epoch, hyper))
        self._fill += 1
        if self._fill == self._ring.shape[0]:
            self._launch_flush()

    def _new_context(self, stats: StepStatistics, context: tuple) -> None:
        """Flushes rows buffered under the old context; (re)allocates the ring if its shape changed."""
        self._launch_flush()
        values = stats.values
        ring = self._ring
        if ring is None or ring.shape[1:] != values.shape or ring.device != values.device or ring.dtype != values.dtype:
            row_bytes = max(1, values.numel() * values.element_size())
            capacity = max(1, min(-(-self.flush_every // self.step_every), _RING_BYTES // row_bytes))
            self._ring = torch.empty((capacity, *values.shape), dtype=values.dtype, device=values.device)
        self._context = context

    # ---- flushing ---------------------------------------------------------------------------
    @torch.no_grad()
    def _launch_flush(self) -> None:
        """Derives the figures of the buffered steps on the device and starts copying them out."""
        n = self._fill
        if n == 0:
            return
        assert self._ring is not None and self._context is not None
        numel, groups, num_groups, prev = self._context
        rows = self._ring.shape[1]
        device = self._ring.device
        flat = self._ring[:n].reshape(n * rows, self._ring.shape[2])
        tiled_prev = prev.repeat(n) if prev is not None else None
        tiled_numel = numel.repeat(n)
        step_index = torch.arange(n, device=device).repeat_interleave(rows)
        # Every buffered step is one "group" of StepStatistics: the optimizer's own derivation,
        # batched over the steps (per-step overall figures), then over (step, group) pairs.
        overall = StepStatistics(flat, tiled_numel, step_index, n, None, prev_step_sumsq=tiled_prev).derived("group")
        parts = [torch.stack([overall[k] for k in STEP_FIGURES], 1)]
        if num_groups > 1:
            pair_index = step_index * num_groups + groups.repeat(n)
            per_group = StepStatistics(
                flat, tiled_numel, pair_index, n * num_groups, None, prev_step_sumsq=tiled_prev
            ).derived("group")
            parts.append(torch.stack([per_group[k] for k in STEP_FIGURES], 1))
        tensor_hyper = [
            v for _, _, hyper in self._meta for hp in hyper if type(hp) is _TensorHyper for v in hp if isinstance(v, Tensor)
        ]
        if tensor_hyper:
            parts.append(torch.stack([v.to(device=device, dtype=torch.float64).reshape(()) for v in tensor_hyper]))
        payload = torch.cat([p.reshape(-1).to(torch.float64) for p in parts])
        if payload.is_cuda:
            host = torch.empty(payload.shape, dtype=payload.dtype, pin_memory=True)
            host.copy_(payload, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = payload, None
        self._pending.append(_Pending(host, event, self._meta, num_groups, bool(tensor_hyper)))
        self._meta = []
        self._fill = 0
        self._drain(block=False)

    def _drain(self, block: bool) -> None:
        """Writes landed blocks to the store, oldest first; waits for them only when `block`.

        From the step hook (`block` False) a store that is busy or failing does not stop the
        training: the block stays queued, a warning is issued, and the next flush retries. With
        `block` (epoch ends, checkpoints, close) the error propagates: no row is ever skipped.
        """
        while self._pending:
            pending = self._pending[0]
            if pending.event is not None:
                if not block and not pending.event.query():
                    return
                pending.event.synchronize()
            try:
                self._write_block(pending)
            except sqlite3.OperationalError as e:
                if block:
                    raise
                warnings.warn(f"instrumented_adam: step rows not written yet ({e}); retrying at the next flush", RuntimeWarning)
                return
            self._pending.popleft()

    def _write_block(self, pending: _Pending) -> None:
        values = pending.host.numpy()
        n, num_groups, nf = len(pending.meta), pending.num_groups, len(STEP_FIGURES)
        overall = values[: n * nf].reshape(n, nf)
        offset = n * nf
        per_group = None
        if num_groups > 1:
            per_group = values[offset : offset + n * num_groups * nf].reshape(n, num_groups, nf).tolist()
            offset += n * num_groups * nf
        meta = pending.meta
        if pending.tensor_hyper:  # replace the cloned tensors by their values, in launch order
            tensor_values = iter(values[offset:].tolist())
            meta = [
                (step, epoch, tuple(
                    tuple(next(tensor_values) if isinstance(v, Tensor) else v for v in hp) if type(hp) is _TensorHyper else hp
                    for hp in hyper
                ))
                for step, epoch, hyper in meta
            ]
        # Plain tuples of Python numbers: this runs once per flush for every buffered step.
        columns = ("step", "epoch", *HYPER_COLUMNS, *STEP_FIGURES)
        rows = [(step, epoch, *hyper[0], *figs) for (step, epoch, hyper), figs in zip(meta, overall.tolist())]
        group_rows = []
        if per_group is not None:
            group_rows = [
                (step, g, epoch, *hyper[g], *per_group[i][g])
                for i, (step, epoch, hyper) in enumerate(meta)
                for g in range(num_groups)
            ]
        self.store.write_steps(self.run_id, columns, rows, group_rows)
        epochs = np.fromiter((m[1] for m in meta), dtype=np.int64, count=n)
        mine = overall[epochs == self._epoch]
        if len(mine):
            self._epoch_figures.append(mine.copy())
        if self._tb is not None:
            self._tb.log_steps([dict(zip(columns, r)) for r in rows], [dict(zip(("step", "grp", *columns[1:]), r)) for r in group_rows])

    def flush(self) -> None:
        """Writes every buffered step row to the store now (waits for the device copy)."""
        self._launch_flush()
        self._drain(block=True)

    # ---- metrics ----------------------------------------------------------------------------
    def _check_metrics(self, metrics: Mapping[str, Any], against: Mapping[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, value in metrics.items():
            if not isinstance(name, str) or not _METRIC_NAME.match(name):
                raise ValueError(
                    f"metric name {name!r} is not valid: start with a letter, then letters, digits, '_', '.', '-' or '/'"
                )
            if name in _RESERVED_METRICS:
                raise MetricClashError(f"metric name {name!r} clashes with a built-in column of the epoch rows; rename it")
            if name in against or name in out:
                raise MetricClashError(f"metric {name!r} is already logged for epoch {self._epoch}; log each metric once per epoch")
            if torch.is_tensor(value):
                if value.numel() != 1:
                    raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
                value = value.item()
            try:
                out[name] = float(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"metric {name!r} must be a number, got {value!r}") from e
        return out

    def log_metrics(self, metrics: Mapping[str, Any] | None = None, /, *, epoch: int | None = None, **kwargs: Any) -> None:
        """Logs user metrics (train/val loss, accuracy, ...) for an epoch.

        Without `epoch` (or with the epoch in progress) they are written with that epoch's row by
        the next `end_epoch`; with an earlier epoch (e.g. a validation run after `end_epoch`),
        they are written now. A metric is logged once per epoch; a name of a built-in column is
        refused (`MetricClashError`).
        """
        merged = {**(metrics or {}), **kwargs}
        if epoch is None or epoch == self._epoch:
            self._staged_metrics.update(self._check_metrics(merged, self._staged_metrics))
            return
        if epoch > self._epoch or epoch < 0:
            raise ValueError(f"epoch {epoch} is not a recorded epoch (the epoch in progress is {self._epoch})")
        values = self._check_metrics(merged, {})
        self.store.write_metrics(self.run_id, epoch, values)
        if self._tb is not None:
            self._tb.log_metrics(epoch, None, values)

    # ---- epochs -----------------------------------------------------------------------------
    @torch.no_grad()
    def end_epoch(self, **metrics: Any) -> dict[str, float]:
        """Ends the epoch: ``optimizer.end_epoch()``, then the epoch row, its layer rows and metrics.

        Keyword arguments are user metrics of the epoch (``train_loss=..., val_accuracy=...``).
        Flushes the step rows first. Returns the epoch row (with the metrics) as floats, e.g.
        for a learning-rate rule that reads ``cos_prev``.
        """
        self._check_open()
        values = self._check_metrics(metrics, self._staged_metrics)  # before anything changes state
        values = {**self._staged_metrics, **values}
        self.flush()
        opt = self.optimizer
        step = opt.steps_done + self._step_offset
        num_steps = step - self._epoch_start_step
        nf = len(STEP_FIGURES)
        last_tensor = None
        if num_steps > 0 and opt.steps_done > 0:
            # Before opt.end_epoch(): the last step's cos_update_prev_epoch uses this epoch's s_{k-1}.
            derived = opt.last_step_statistics().derived("tensor")
            last_tensor = torch.stack([derived[k] for k in STEP_FIGURES], 1).cpu().numpy()
        geometry = opt.end_epoch() if getattr(opt, "epoch_geometry", True) else None
        if geometry is not None:
            overall = geometry.derived("overall")
            per_tensor = geometry.derived("tensor")
            geo_overall = torch.stack([overall[k][0] for k in EPOCH_FIGURES]).cpu().tolist()
            geo_tensor = torch.stack([per_tensor[k] for k in EPOCH_FIGURES], 1).cpu().numpy()
        else:
            geo_overall = [math.nan] * len(EPOCH_FIGURES)
            geo_tensor = None

        figures = np.concatenate(self._epoch_figures) if self._epoch_figures else np.zeros((0, nf))
        with warnings.catch_warnings():  # all-NaN columns (cos_update_prev_epoch in epoch 0) give NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            if len(figures):
                stats = {"mean": np.nanmean(figures, 0), "min": np.nanmin(figures, 0), "max": np.nanmax(figures, 0)}
            else:
                stats = {a: np.full(nf, math.nan) for a in ("mean", "min", "max")}
        hyper = self._last_hyper if self._last_hyper is not None else tuple(_group_hyper(g) for g in opt.param_groups)
        row: dict[str, Any] = {
            "epoch": self._epoch,
            "step": step,
            "num_steps": num_steps,
            "recorded_steps": len(figures),
            "wall_time": time.time(),
            **dict(zip(HYPER_COLUMNS, _host_hyper(hyper[0]))),
            **dict(zip(EPOCH_FIGURES, geo_overall)),
        }
        for j, f in enumerate(STEP_FIGURES):
            for a in ("mean", "min", "max"):
                row[f"{f}_{a}"] = float(stats[a][j])

        layer_rows = []
        names = self._layer_names()
        group_of = [g for g, group in enumerate(opt.param_groups) for _ in group["params"]]
        params = [p for group in opt.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            geo = geo_tensor[i].tolist() if geo_tensor is not None and i < len(geo_tensor) else [math.nan] * len(EPOCH_FIGURES)
            fig = last_tensor[i].tolist() if last_tensor is not None and i < len(last_tensor) else [math.nan] * nf
            layer_rows.append((i, names[i], group_of[i], p.numel(), *geo, *fig))
        self.store.write_epoch(self.run_id, row, LAYER_COLUMNS, layer_rows, values)
        if self._tb is not None:
            self._tb.log_epoch(row, values, [dict(zip(LAYER_COLUMNS, r)) for r in layer_rows])
        self._epoch += 1
        self._epoch_start_step = step
        self._epoch_figures = []
        self._staged_metrics = {}
        return {**{k: float(v) for k, v in row.items()}, **values}

    def _layer_names(self) -> list[str]:
        """Parameter names by statistics row: the model's names, else ``param.<i>``."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        known: dict[int, str] = {}
        if self.model is not None:
            for name, p in self.model.named_parameters(remove_duplicate=False):
                known.setdefault(id(p), name)
        return [known.get(id(p), f"param.{i}") for i, p in enumerate(params)]

    @property
    def epoch(self) -> int:
        """The epoch in progress (0-based)."""
        return self._epoch

    # ---- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path, model: torch.nn.Module | None = None, *, extra: Mapping[str, Any] | None = None) -> Path:
        """Saves model, optimizer, recorder position and RNG states in one file, atomically.

        Meant for epoch ends (after `end_epoch`); a mid-epoch checkpoint also carries the
        epoch's step figures so far. `extra` (tensors and plain containers) is stored as is,
        e.g. an LR scheduler's state_dict, and comes back from `Recorder.resume(...).extra`.
        """
        self._check_open()
        model = model if model is not None else self.model
        self.flush()
        opt = self.optimizer
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": model.state_dict() if model is not None else None,
            "model_fingerprint": model_fingerprint(model) if model is not None else None,
            "optimizer": opt.state_dict(),
            "optimizer_class": type(opt).__name__,
            "recorder": self._position(),
            "rng": rng_state(),
            "extra": dict(extra) if extra is not None else None,
        }
        path = atomic_save(payload, path)
        self.store.record_checkpoint(self.run_id, opt.steps_done + self._step_offset, self._epoch, path)
        return path

    def _position(self) -> dict[str, Any]:
        info = self.store.conn.execute("SELECT name, started_at FROM runs WHERE run_id=?", (self.run_id,)).fetchone()
        figures = np.concatenate(self._epoch_figures) if self._epoch_figures else np.zeros((0, len(STEP_FIGURES)))
        return {
            "run_id": self.run_id,
            "run_name": info[0],
            "started_at": info[1],
            "store": str(self.store.path.resolve()),
            "step": self.optimizer.steps_done + self._step_offset,
            "step_offset": self._step_offset,
            "epoch": self._epoch,
            "epoch_start_step": self._epoch_start_step,
            "step_every": self.step_every,
            "flush_every": self.flush_every,
            "step_figures": list(STEP_FIGURES),
            "epoch_figures": torch.from_numpy(figures),
            "staged_metrics": dict(self._staged_metrics),
            "last_hyper": [list(_host_hyper(hp)) for hp in self._last_hyper] if self._last_hyper is not None else None,
        }

    @staticmethod
    def _load_into(ckpt: dict[str, Any], optimizer: torch.optim.Optimizer, model: torch.nn.Module | None, load_optimizer: bool) -> None:
        """Validates everything first, then loads: a mismatch leaves model and optimizer untouched."""
        if ckpt.get("model") is not None:
            if model is None:
                raise CheckpointError("the checkpoint holds a model state: pass the model to restore it")
            check_model(ckpt["model_fingerprint"], model)
        elif model is not None:
            raise CheckpointError("the checkpoint holds no model state (it was saved without a model)")
        if load_optimizer:
            try:
                optimizer.load_state_dict(ckpt["optimizer"])  # validates before it changes anything
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(
                    f"the checkpoint's optimizer state ({ckpt.get('optimizer_class')}) does not fit this "
                    f"{type(optimizer).__name__}: {e}"
                ) from e
        if model is not None:
            model.load_state_dict(ckpt["model"])

    @classmethod
    def resume(
        cls,
        checkpoint: str | Path,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module | None = None,
        store: RunStore | str | Path | None = None,
        *,
        map_location: Any = "cpu",
        tensorboard: str | Path | None = None,
    ) -> "Recorder":
        """Continues the run a checkpoint belongs to: restores model, optimizer and RNG states,
        deletes the run's rows beyond the checkpoint (one transaction) and records on.

        The store then holds exactly the rows of an uninterrupted run. `store` defaults to the
        path recorded in the checkpoint. The file is read to the CPU (`map_location`); the model
        and optimizer loads move the tensors to their parameters' devices.
        """
        ckpt = load_checkpoint(checkpoint, map_location=map_location)
        position = ckpt["recorder"]
        if list(position["step_figures"]) != list(STEP_FIGURES):
            raise CheckpointError(
                f"the checkpoint was written with step figures {position['step_figures']}, this version records "
                f"{list(STEP_FIGURES)}: finish the run with the version that started it"
            )
        store_obj = store if isinstance(store, RunStore) else RunStore(store if store is not None else position["store"])
        try:
            run = store_obj.conn.execute("SELECT name, started_at FROM runs WHERE run_id=?", (position["run_id"],)).fetchone()
            if run is None or tuple(run) != (position["run_name"], position["started_at"]):
                raise CheckpointError(
                    f"run {position['run_id']} ({position['run_name']!r}, started {position['started_at']}) of this "
                    f"checkpoint is not in {store_obj.path}: pass the store the run was recorded in"
                )
            cls._load_into(ckpt, optimizer, model, load_optimizer=True)
            if optimizer.steps_done + position["step_offset"] != position["step"]:
                raise CheckpointError("the optimizer's step counter does not match the checkpoint's position")
            set_rng_state(ckpt["rng"])
            rec = cls.__new__(cls)
            rec._setup(optimizer, store_obj, model, position["step_every"], position["flush_every"], tensorboard)
        except BaseException:
            if not isinstance(store, RunStore):
                store_obj.close()
            raise
        rec._owns_store = not isinstance(store, RunStore)
        rec.run_id = int(position["run_id"])
        rec.run_name = position["run_name"]
        rec._step_offset = int(position["step_offset"])
        rec._epoch = int(position["epoch"])
        rec._epoch_start_step = int(position["epoch_start_step"])
        figures = position["epoch_figures"].cpu().numpy()
        rec._epoch_figures = [figures] if len(figures) else []
        rec._staged_metrics = dict(position["staged_metrics"])
        if position["last_hyper"] is not None:
            rec._last_hyper = tuple(tuple(hp) for hp in position["last_hyper"])
        rec.extra = ckpt.get("extra")
        rec.store.truncate_run(rec.run_id, step=int(position["step"]), epoch=rec._epoch)
        # (again) the checkpoint resumed from: a crash may have come between its file and its row
        rec.store.record_checkpoint(rec.run_id, int(position["step"]), rec._epoch, checkpoint)
        rec._attach()
        return rec

    @classmethod
    def branch(
        cls,
        checkpoint: str | Path,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module | None = None,
        store: RunStore | str | Path | None = None,
        *,
        run_name: str,
        overrides: Mapping[str, Any] | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        load_optimizer_state: bool = True,
        seed: int | None = None,
        map_location: Any = "cpu",
        **kwargs: Any,
    ) -> "Recorder":
        """Starts a new run from a checkpoint of another, with the lineage recorded.

        Loads the model (and the optimizer state unless `load_optimizer_state` is False, e.g.
        when switching Adam -> Adamax), sets `overrides` (lr, betas, eps, weight_decay, ...) on
        every param group, restores the checkpoint's RNG states (or seeds everything with `seed`),
        and records a child run whose parent is the checkpoint's run and whose branch_epoch is
        the number of epochs done at the checkpoint. Step and epoch numbers continue from the
        checkpoint's. `hyperparameters` default to the parent's, updated with `overrides`.
        Other keyword arguments go to `Recorder`.
        """
        ckpt = load_checkpoint(checkpoint, map_location=map_location)
        position = ckpt["recorder"]
        store_obj = store if isinstance(store, RunStore) else RunStore(store if store is not None else position["store"], create=False)
        try:
            parent = store_obj.run_info(position["run_id"])
            for key in overrides or {}:
                missing = [g for g, group in enumerate(optimizer.param_groups) if key not in group]
                if missing:
                    raise KeyError(f"override {key!r} is not a setting of {type(optimizer).__name__}'s param groups")
            cls._load_into(ckpt, optimizer, model, load_optimizer=load_optimizer_state)
            for group in optimizer.param_groups:
                group.update(overrides or {})
            if seed is not None:
                seed_everything(seed)
            else:
                set_rng_state(ckpt["rng"])
            if hyperparameters is None:
                hyperparameters = {**(parent["hyperparameters"] or {}), **(overrides or {})}
            rec = cls.__new__(cls)
            rec._setup(
                optimizer, store_obj, model, kwargs.pop("step_every", position["step_every"]),
                kwargs.pop("flush_every", position["flush_every"]), kwargs.pop("tensorboard", None),
            )
            rec._owns_store = not isinstance(store, RunStore)
            rec._step_offset = int(position["step"]) - int(optimizer.steps_done)
            rec._epoch = int(position["epoch"])
            rec._epoch_start_step = int(position["step"])
            rec.extra = ckpt.get("extra")
            rec.run_id = rec._create_run(
                run_name, hyperparameters, seed if seed is not None else parent["seed"], position["run_id"],
                int(position["epoch"]), kwargs.pop("code_version", None), branch_step=int(position["step"]),
            )
            if kwargs:
                raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        except BaseException:
            if not isinstance(store, RunStore):
                store_obj.close()
            raise
        rec._attach()
        return rec

    # ---- lifecycle --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the recorder of run {self.run_id} is closed")

    def _release_store(self) -> None:
        if self._owns_store:
            self.store.close()

    def close(self, status: str = "finished") -> None:
        """Flushes, detaches the hook and marks the run `status` ('finished' or 'failed')."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
            try:
                self.store.set_status(self.run_id, status)
            finally:
                if self._tb is not None:
                    self._tb.close()
                self._release_store()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("failed" if exc_type is not None else "finished")

    def __repr__(self) -> str:
        return f"Recorder(run {self.run_id} {self.run_name!r} in {str(self.store.path)!r}, epoch {self._epoch})"


__all__ = ["Recorder", "STEP_FIGURES", "EPOCH_FIGURES", "AGGREGATES", "LAYER_COLUMNS", "code_version", "StoreError"]
