"""The run writer: batched derive and write of step rows, epoch rows, layer rows and metrics.

A `CapturedBlock` of buffered steps is reduced on the device in one batched pass (the same
`StepStatistics.derived` code the optimizer uses, applied to all buffered steps at once), copied
out non-blocking into pinned memory, and written to the store once the copy has landed (an event
is polled, not waited on, except at epoch ends, checkpoints and close). On CPU the same code runs
and the copy is immediate.

Step rows hold the overall figures (and, with several param groups, per-group rows) beside the
hyperparameters in force, the ``skipped`` flag and the loss scale under AMP. A step GradScaler
skipped is recorded as skipped: its figures are NaN (the kernel measured nothing), except
``nonfinite_grads`` where it was counted. Epoch aggregates (mean/min/max of each step figure over
the epoch's recorded, not skipped, steps; NaN values left out as pandas does) are running sums:
O(1) memory however long the epoch, and what a mid-epoch checkpoint carries.
"""

from __future__ import annotations

import collections
import math
import re
import sqlite3
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from ..core.figures import aggregate_names
from ..core.stats import EPOCH_FIGURES as _EPOCH_FIGURES
from ..core.stats import STEP_FIGURES as _STEP_FIGURES
from ..core.stats import StepStatistics
from .capture import CapturedBlock, StepMeta
from .store import MetricClashError, RunStore

#: The per-step figures recorded (keys of `StepStatistics.derived`), in column order.
#: EPOCH_FIGURES: the epoch geometry (keys of `EpochGeometry.derived`). Both come from the
#: declarations in core.figures over this build's statistics tables.
STEP_FIGURES: tuple[str, ...] = tuple(f.name for f in _STEP_FIGURES)
EPOCH_FIGURES: tuple[str, ...] = tuple(f.name for f in _EPOCH_FIGURES)
#: The epoch aggregates of the step figures: f_mean, f_min, f_max for each step figure f.
AGGREGATES: tuple[str, ...] = aggregate_names(STEP_FIGURES)
#: Columns of an epoch row besides hyperparameters and figures (run_id is added by the store).
EPOCH_BASE_COLUMNS: tuple[str, ...] = ("epoch", "step", "num_steps", "recorded_steps", "skipped_steps", "wall_time")
#: Columns of a step row besides hyperparameters and figures.
STEP_BASE_COLUMNS: tuple[str, ...] = ("step", "epoch", "skipped", "grad_scale")
#: Columns of a layer row after run_id and epoch.
LAYER_COLUMNS: tuple[str, ...] = ("layer_index", "layer", "grp", "numel", *EPOCH_FIGURES, *STEP_FIGURES)

_METRIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-/]*$")
_RESERVED_METRICS = frozenset(
    {"run_id", "name", "value", "layer", "layer_index", "grp", "numel", "lr", "weight_decay", *STEP_BASE_COLUMNS,
     *EPOCH_BASE_COLUMNS, *EPOCH_FIGURES, *STEP_FIGURES, *AGGREGATES}
)
_NONFINITE_INDEX = STEP_FIGURES.index("nonfinite_grads") if "nonfinite_grads" in STEP_FIGURES else None
_PARAM_NORM_INDEX = STEP_FIGURES.index("param_norm") if "param_norm" in STEP_FIGURES else None


class EpochAggregates:
    """Running mean/min/max of the step figures over an epoch's recorded, not skipped, steps.

    O(1) memory: a count, a sum, a min and a max per figure. Sums are accumulated row by row in
    step order (`numpy.cumsum` is sequential), so the result does not depend on how the steps
    were split into flushes: a resumed run aggregates exactly as an uninterrupted one.
    """

    def __init__(self, num_figures: int = len(STEP_FIGURES)) -> None:
        self.count = np.zeros(num_figures)
        self.total = np.zeros(num_figures)
        self.low = np.full(num_figures, math.inf)
        self.high = np.full(num_figures, -math.inf)
        self.recorded_steps = 0  # recorded step rows of the epoch, skipped ones included
        self.skipped_steps = 0

    def add(self, figures: np.ndarray, skipped: np.ndarray) -> None:
        """Adds a block of step rows ([n, figures]); rows with `skipped` set count only as skipped."""
        self.recorded_steps += len(figures)
        self.skipped_steps += int(skipped.sum())
        kept = figures[~skipped]
        if not len(kept):
            return
        finite = ~np.isnan(kept)
        self.count += finite.sum(0)
        self.total = np.cumsum(np.vstack([self.total, np.where(finite, kept, 0.0)]), axis=0)[-1]
        self.low = np.fmin(self.low, np.where(finite, kept, math.inf).min(0))
        self.high = np.fmax(self.high, np.where(finite, kept, -math.inf).max(0))

    def row(self) -> dict[str, float]:
        """f_mean, f_min, f_max of each step figure (NaN where the epoch has no value of it)."""
        seen = self.count > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(seen, self.total / np.where(seen, self.count, 1), math.nan)
        low = np.where(seen, self.low, math.nan)
        high = np.where(seen, self.high, math.nan)
        out: dict[str, float] = {}
        for j, f in enumerate(STEP_FIGURES):
            out[f"{f}_mean"], out[f"{f}_min"], out[f"{f}_max"] = float(mean[j]), float(low[j]), float(high[j])
        return out

    def state(self) -> dict[str, Any]:
        """For a checkpoint: a few tensors, whatever the epoch's length."""
        return {
            "count": torch.from_numpy(self.count.copy()), "total": torch.from_numpy(self.total.copy()),
            "low": torch.from_numpy(self.low.copy()), "high": torch.from_numpy(self.high.copy()),
            "recorded_steps": self.recorded_steps, "skipped_steps": self.skipped_steps,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "EpochAggregates":
        agg = cls()
        agg.count, agg.total = state["count"].numpy().copy(), state["total"].numpy().copy()
        agg.low, agg.high = state["low"].numpy().copy(), state["high"].numpy().copy()
        agg.recorded_steps, agg.skipped_steps = int(state["recorded_steps"]), int(state["skipped_steps"])
        return agg

    @classmethod
    def from_figures(cls, figures: np.ndarray) -> "EpochAggregates":
        """From the per-step figures a checkpoint of an older version carried."""
        agg = cls()
        agg.add(figures, np.zeros(len(figures), dtype=bool))
        return agg


@dataclass
class _Pending:
    """A derived block of steps whose figures are on their way to the host."""

    host: Tensor  # payload: overall [n, F], then per-group [n*G, F] when G > 1, then deferred tensors
    event: Any  # torch.cuda.Event, or None when the payload is already on the host
    meta: list[StepMeta]
    num_groups: int
    hyper_names: tuple[str, ...]
    num_deferred: int  # tensors of the meta (hyperparameters, AMP flags) whose values follow the figures


def _deferred_tensors(meta: list[StepMeta]) -> list[Tensor]:
    """The meta's tensors in a fixed order (launch order = read-back order)."""
    out: list[Tensor] = []
    for m in meta:
        if m.has_tensors:
            out += [v for hp in m.hyper for v in hp if isinstance(v, Tensor)]
            out += [v for v in (m.found_inf, m.grad_scale, m.nonfinite) if isinstance(v, Tensor)]
    return out


def _resolve(meta: list[StepMeta], values: list[float]) -> list[StepMeta]:
    """The meta with its tensors replaced by their values (same order as `_deferred_tensors`)."""
    it = iter(values)
    out = []
    for m in meta:
        if m.has_tensors:
            hyper = tuple(tuple(next(it) if isinstance(v, Tensor) else v for v in hp) for hp in m.hyper)
            amp = [next(it) if isinstance(v, Tensor) else v for v in (m.found_inf, m.grad_scale, m.nonfinite)]
            m = StepMeta(m.step, m.epoch, hyper, *amp, has_tensors=False)
        out.append(m)
    return out


class RunWriter:
    """Writes one run's rows: step blocks (batched), epoch and layer rows, metrics.

    Args:
        store: the open `RunStore` (this writer holds the run's lease through it).
        run_id: the run written.
        tensorboard: an `export.TensorBoardLogger` mirroring the rows, or None.
    """

    def __init__(self, store: RunStore, run_id: int, tensorboard: Any = None) -> None:
        self.store = store
        self.run_id = run_id
        self.tb = tensorboard
        self.epoch = 0  # the epoch in progress: blocks of it feed `aggregates`
        self.aggregates = EpochAggregates()
        self.num_groups_written: int | None = None  # groups of the rows written so far (None: none yet)
        self.diverged: str | None = None  # where the run first went non-finite (status detail)
        self._pending: collections.deque[_Pending] = collections.deque()

    # ---- step blocks ------------------------------------------------------------------------
    @torch.no_grad()
    def launch(self, block: CapturedBlock) -> None:
        """Derives the figures of a block on the device and starts copying them out."""
        n, rows, width = block.ring.shape
        device = block.ring.device
        flat = block.ring.reshape(n * rows, width)
        tiled_prev = block.prev_step_sumsq.repeat(n) if block.prev_step_sumsq is not None else None
        tiled_numel = block.numel.repeat(n)
        step_index = torch.arange(n, device=device).repeat_interleave(rows)
        # Every buffered step is one "group" of StepStatistics: the optimizer's own derivation,
        # batched over the steps (per-step overall figures), then over (step, group) pairs.
        overall = StepStatistics(flat, tiled_numel, step_index, n, None, prev_step_sumsq=tiled_prev).derived("group")
        parts = [torch.stack([overall[k] for k in STEP_FIGURES], 1)]
        if block.num_groups > 1:
            pair_index = step_index * block.num_groups + block.groups.repeat(n)
            per_group = StepStatistics(
                flat, tiled_numel, pair_index, n * block.num_groups, None, prev_step_sumsq=tiled_prev
            ).derived("group")
            parts.append(torch.stack([per_group[k] for k in STEP_FIGURES], 1))
        deferred = _deferred_tensors(block.meta)
        if deferred:
            parts.append(torch.stack([v.to(device=device, dtype=torch.float64).reshape(()) for v in deferred]))
        payload = torch.cat([p.reshape(-1).to(torch.float64) for p in parts])
        if payload.is_cuda:
            host = torch.empty(payload.shape, dtype=payload.dtype, pin_memory=True)
            host.copy_(payload, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = payload, None
        self._pending.append(_Pending(host, event, block.meta, block.num_groups, block.hyper_names, len(deferred)))
        self.drain(block=False)

    def drain(self, block: bool) -> None:
        """Writes landed blocks to the store, oldest first; waits for them only when `block`.

        From the step hook (`block` False) a store that is busy does not stop the training: the
        block stays queued, a warning is issued, and the next flush retries. With `block` (epoch
        ends, checkpoints, close) the error propagates: no row is ever skipped. A lost lease
        (`LeaseLostError`) always propagates: this writer must stop.
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
        overall = values[: n * nf].reshape(n, nf).copy()
        offset = n * nf
        per_group = None
        if num_groups > 1:
            per_group = values[offset : offset + n * num_groups * nf].reshape(n, num_groups, nf).copy()
            offset += n * num_groups * nf
        meta = _resolve(pending.meta, values[offset:].tolist()) if pending.num_deferred else pending.meta
        skipped = np.fromiter((bool(m.found_inf) for m in meta), dtype=bool, count=n)
        if skipped.any():
            # The kernel skipped these steps whole and measured nothing: not a row of zeros.
            overall[skipped] = math.nan
            if per_group is not None:
                per_group[skipped] = math.nan
            if _NONFINITE_INDEX is not None:
                counts = [m.nonfinite if m.nonfinite is not None else math.nan for m, s in zip(meta, skipped) if s]
                overall[skipped, _NONFINITE_INDEX] = counts
        if num_groups != self.num_groups_written:
            self._groups_changed(num_groups)
        amp = [(int(bool(m.found_inf)), m.grad_scale) for m in meta]  # skipped: 0 for a step that ran
        # Plain tuples of Python numbers: this runs once per flush for every buffered step.
        names = pending.hyper_names
        columns = (*STEP_BASE_COLUMNS, *names, *STEP_FIGURES)
        rows = [(m.step, m.epoch, *a, *m.hyper[0], *figs) for m, a, figs in zip(meta, amp, overall.tolist())]
        group_rows = []
        if per_group is not None:
            pg = per_group.tolist()
            group_rows = [(m.step, g, m.epoch, *amp[i], *m.hyper[g], *pg[i][g]) for i, m in enumerate(meta) for g in range(num_groups)]
        self.store.write_steps(self.run_id, columns, rows, group_rows, hyperparameters=names)
        epochs = np.fromiter((m.epoch for m in meta), dtype=np.int64, count=n)
        mine = epochs == self.epoch
        if mine.any():
            self.aggregates.add(overall[mine], skipped[mine])
        if self.diverged is None and _PARAM_NORM_INDEX is not None:
            bad = np.flatnonzero(~skipped & ~np.isfinite(overall[:, _PARAM_NORM_INDEX]))
            if len(bad):
                m = meta[int(bad[0])]
                self.mark_diverged(f"parameters non-finite (param_norm {overall[bad[0], _PARAM_NORM_INDEX]}) "
                                   f"at step {m.step} (epoch {m.epoch})")
        if self.tb is not None:
            self.tb.log_steps([dict(zip(columns, r)) for r in rows],
                              [dict(zip(("step", "grp", *columns[1:]), r)) for r in group_rows])

    def _groups_changed(self, num_groups: int) -> None:
        """The optimizer's param groups changed (``add_param_group``) or are first written.

        The store keeps single-group runs in `steps` only and reads them as group 0; once a run
        has several groups its `step_groups` rows are read instead, so the steps written while it
        had one group are copied there first (once), and the run's num_groups is updated: no
        duplicated and no missing rows in `step_groups()`.
        """
        before = self.num_groups_written
        if before is None:
            info = self.store.run_info(self.run_id)
            before = int(info["num_groups"]) if not _isna(info["num_groups"]) else 1
        if before <= 1 < num_groups:
            old = self.store.steps(self.run_id)
            if len(old):
                cols = [c for c in old.columns if c != "run_id"]
                data = old[cols].astype(object).where(old[cols].notna(), None).itertuples(index=False, name=None)
                hyper = [c for c in self.store.hyperparameter_columns(self.run_id) if c in cols]
                self.store.write_steps(self.run_id, cols, [], [(r[0], 0, *r[1:]) for r in data], hyperparameters=hyper)
        if before != num_groups:
            self.store.set_num_groups(self.run_id, num_groups)
        self.num_groups_written = num_groups

    def pending_blocks(self) -> int:
        return len(self._pending)

    # ---- divergence ---------------------------------------------------------------------------
    def mark_diverged(self, where: str) -> None:
        """Marks the run 'diverged' (once: the first place it went non-finite)."""
        if self.diverged is not None:
            return
        self.diverged = where
        self.store.set_status(self.run_id, "diverged", detail=where)
        warnings.warn(f"instrumented_adam: run {self.run_id} diverged: {where}", RuntimeWarning, stacklevel=3)

    def check_losses(self, values: Mapping[str, float], epoch: int, step: int) -> None:
        """A logged loss (a metric whose name contains 'loss') that is not finite marks the run diverged."""
        for name, value in values.items():
            if "loss" in name.lower() and not math.isfinite(value):
                self.mark_diverged(f"{name} = {value} at epoch {epoch} (step {step})")
                return

    # ---- metrics ----------------------------------------------------------------------------
    @staticmethod
    def check_metrics(metrics: Mapping[str, Any], against: Mapping[str, Any], epoch: int,
                      reserved: frozenset[str] = frozenset()) -> dict[str, float]:
        """Validated metrics as floats: names, once per epoch, no clash with built-in columns."""
        out: dict[str, float] = {}
        for name, value in metrics.items():
            if not isinstance(name, str) or not _METRIC_NAME.match(name):
                raise ValueError(
                    f"metric name {name!r} is not valid: start with a letter, then letters, digits, '_', '.', '-' or '/'"
                )
            if name in _RESERVED_METRICS or name in reserved:
                raise MetricClashError(f"metric name {name!r} clashes with a built-in column of the epoch rows; rename it")
            if name in against or name in out:
                raise MetricClashError(f"metric {name!r} is already logged for epoch {epoch}; log each metric once per epoch")
            if torch.is_tensor(value):
                if value.numel() != 1:
                    raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
                value = value.item()
            try:
                out[name] = float(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"metric {name!r} must be a number, got {value!r}") from e
        return out

    def write_late_metrics(self, epoch: int, values: Mapping[str, float], step: int) -> None:
        """Metrics of an epoch already written (a validation after `end_epoch`), written now."""
        self.store.write_metrics(self.run_id, epoch, values)
        if self.tb is not None:
            self.tb.log_metrics(epoch, None, values)

    # ---- epochs -----------------------------------------------------------------------------
    def write_epoch(self, row: dict[str, Any], layer_rows: list[tuple], metrics: Mapping[str, float],
                    hyper_names: tuple[str, ...]) -> dict[str, Any]:
        """Writes the epoch row (with this epoch's aggregates), its layers and metrics; starts the next epoch."""
        row = {**row, "recorded_steps": self.aggregates.recorded_steps, "skipped_steps": self.aggregates.skipped_steps,
               **self.aggregates.row()}
        self.store.write_epoch(self.run_id, row, LAYER_COLUMNS, layer_rows, metrics, hyperparameters=hyper_names)
        if self.tb is not None:
            self.tb.log_epoch(row, metrics, [dict(zip(LAYER_COLUMNS, r)) for r in layer_rows])
        self.epoch += 1
        self.aggregates = EpochAggregates()
        return row


def _isna(value: Any) -> bool:
    try:
        return value is None or bool(np.isnan(value))
    except TypeError:
        return value is None or str(value) == "<NA>"


__all__ = ["RunWriter", "EpochAggregates", "STEP_FIGURES", "EPOCH_FIGURES", "AGGREGATES", "LAYER_COLUMNS",
           "EPOCH_BASE_COLUMNS", "STEP_BASE_COLUMNS"]
