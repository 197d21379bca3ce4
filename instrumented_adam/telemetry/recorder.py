"""The telemetry recorder: per-step and per-epoch rows of an instrumented optimizer, into a RunStore.

    rec = Recorder(optimizer, "runs/exp.sqlite", run_name="baseline", model=model, seed=0)
    for epoch in range(epochs):
        for batch in loader:
            ...; loss.backward(); optimizer.step()     # step rows: captured by a step post-hook
        rec.end_epoch(train_loss=..., val_loss=...)    # epoch boundary + epoch/layer rows + metrics
        rec.save_checkpoint(f"ckpt/{epoch}.pt", model)
    rec.close()

This module is the facade; the work is done by the layers of telemetry:

- `capture` (`StepCapture`): the per-step post-hook's work, one device copy of the optimizer's
  statistics buffer into a device ring, no host sync, no Python loop over tensors;
- `writer` (`RunWriter`): batched derive and write of step rows, epoch rows (running aggregates,
  skipped steps left out), layer rows and metrics; divergence;
- `lineage`: checkpoints' recorder position, `Recorder.resume` and `Recorder.branch`;
- `store` (`RunStore`): the SQLite file, with the run's lease (one writer per run).

Step rows hold the overall figures (and, with several param groups, per-group rows) beside each
group's hyperparameters in force (flattened generically: lr, weight_decay, beta1, beta2, eps for
Adam, whatever numeric settings another optimizer's groups have); epoch rows hold the epoch
geometry, the mean/min/max of the epoch's recorded step figures (skipped and NaN steps left out)
and the user metrics; layer rows hold the epoch geometry and the epoch's last step's figures per
tensor.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import sqlite3
import subprocess
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Mapping

import torch

from . import lineage
from ..core.stats import StepStatistics
from ..core.table import EPOCH_STATS, STEP_STATS
from .capture import CapturedBlock, StepCapture
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_save, model_fingerprint, rng_state
from . import ranks as _ranks
from .store import THETA0_ORIGIN_KEY, RunStore, StoreError
from .writer import AGGREGATES, EPOCH_FIGURES, LAYER_COLUMNS, STEP_FIGURES, RunWriter

#: Recorders whose step hook was traced by torch.compile, by the key the graph's op carries.
_COMPILED_HOOKS: dict[int, "weakref.ref[Recorder]"] = {}
_HOOK_KEYS = itertools.count(1)


@torch.library.custom_op("instrumented_adam_py::record_step", mutates_args=("token",))
def _record_step(token: torch.Tensor, stats: torch.Tensor, step_count: torch.Tensor, numel: torch.Tensor,
                 groups: torch.Tensor, prev_step_sumsq: torch.Tensor | None, num_groups: int, key: int) -> None:
    """The recorder's step hook inside a compiled graph (see `Recorder._trace_step`): the step's
    statistics and their context as the graph computed them (the optimizer's Python-side state
    set in the same compiled call is written only after the graph ran). `token` is declared
    mutated so that the graph keeps the op, in its place after the optimizer's step."""
    ref = _COMPILED_HOOKS.get(key)
    rec = ref() if ref is not None else None
    if rec is not None and not rec._closed:
        steps_done = int(step_count.reshape(-1)[0])
        stats = StepStatistics(values=stats, numel=numel, groups=groups, num_groups=num_groups, names=None,
                               prev_step_sumsq=prev_step_sumsq, step=steps_done)
        rec._on_compiled_step(stats, steps_done)


@_record_step.register_fake
def _record_step_fake(token, stats, step_count, numel, groups, prev_step_sumsq, num_groups, key) -> None:
    return None


#: How each statistics column combines across ranks (core.table: "sum", "max" or "count").
_STEP_KINDS: tuple[str, ...] = tuple(spec.combine for spec in STEP_STATS)
_EPOCH_KINDS: tuple[str, ...] = tuple(spec.combine for spec in EPOCH_STATS)

#: Recorders attached to an optimizer (a second one would measure an epoch step of 0: refused).
_ATTACHED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, weakref.ref]" = weakref.WeakKeyDictionary()


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


def _host(value: Any) -> float:
    """A hyperparameter value as a float (reads a device tensor: only where a sync is fine)."""
    return float(value)


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
        ranks: under torch.distributed, who records: "zero" (default: rank 0 writes the store and
            checkpoints; the other ranks get an inactive recorder that keeps their optimizer's
            epochs in step and writes nothing) or "all" (every rank records its own run,
            ``<name>@rank<r>``, for debugging). Without a process group: this process records.
        check_ranks: at every epoch end, compare the figures the ranks measured (one small
            collective; every rank must call `end_epoch`): data-parallel ranks must agree. The
            largest relative difference is recorded as the epoch metric ``rank_disagreement``.
        rank_rtol, on_rank_mismatch: the tolerance of that check, and what a disagreement does
            ("warn", the default, or "raise" `RankMismatchError`).

    `optimizer` may be a framework's wrapper of an instrumented optimizer (Accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``, ``ZeroRedundancyOptimizer``):
    the recorder unwraps it. Under a sharded optimizer (``ZeroRedundancyOptimizer``, FSDP1, FSDP2)
    every recorded figure is still the whole model's: the recorders of all ranks combine their
    per-shard sums at each flush and epoch end (two small ``all_reduce``s, never per step; see
    `ranks.ShardCombiner`), so every rank must construct its recorder and call `end_epoch`, `flush`
    and `close` at the same points.

    The step capture is a post-hook on ``optimizer.step``: the training loop needs no per-step
    code. Call `end_epoch` once per epoch (it calls ``optimizer.end_epoch()`` itself) and
    `close` at the end. Rows are written only once flushed: a crash loses at most the steps
    since the last flush, never the file. The run's lease in the store is this recorder's
    until `close`: another process writing the same run is refused.

    Step numbers continue from the optimizer's own step count: after loading a checkpoint of
    ``torch.optim.AdamW`` at step 300 the first recorded step is 301. An optimizer has at most
    one open recorder.
    """

    #: Seconds between lease heartbeats from the step hook (writes refresh the lease as well);
    #: well below the store's lease expiry (300 s by default).
    heartbeat_seconds: float = 60.0

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
        ranks: str = "zero",
        check_ranks: bool = False,
        rank_rtol: float = 1e-9,
        on_rank_mismatch: str = "warn",
    ) -> None:
        wrapper, optimizer = optimizer, _ranks.unwrap_optimizer(optimizer)
        self._setup_ranks(ranks, check_ranks, rank_rtol, on_rank_mismatch)
        # A sharded optimizer (ZeRO, FSDP) measures this rank's part of the model: the recorders of
        # all ranks combine their sums at each flush and epoch end (see ranks.ShardCombiner).
        self._combiner = _ranks.shard_combiner(wrapper, optimizer, self.world_size)
        if not self.active:
            self._inactive_step_every, self._inactive_flush_every = int(step_every), int(flush_every)
            self._setup_inactive(optimizer, model)
            return
        if self.world_size > 1 and ranks == "all":
            run_name = f"{run_name or self._default_run_name()}@rank{self.rank}"
            if self.rank != 0 and not isinstance(store, RunStore):
                # One SQLite file per writing process: rank r > 0 records into <stem>.rank<r><suffix>
                # beside rank 0's (two processes creating one new store at once collide).
                path = Path(store)
                store = path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")
        owns_store = not isinstance(store, RunStore)
        self._setup(optimizer, store, model, step_every, flush_every, tensorboard, owns_store)
        try:
            # A torch.optim checkpoint loaded into ours: its steps count (state[p]["step"]).
            self._step_offset = max(0, lineage.own_step_count(optimizer) - int(optimizer.steps_done))
            self._epoch_start_step = int(optimizer.steps_done) + self._step_offset
            self.run_id = self._create_run(run_name, hyperparameters, seed, parent_run, branch_epoch, code_version)
        except BaseException:
            self._release_store()
            raise
        self._start_writer()
        self._attach()

    def _setup_ranks(self, ranks: str = "zero", check_ranks: bool = False, rank_rtol: float = 1e-9,
                     on_rank_mismatch: str = "warn") -> None:
        """Who records in this process (see `ranks`); called first by every constructor path."""
        _ranks.check_choice("ranks", ranks, _ranks.RECORDING_RANKS)
        _ranks.check_choice("on_rank_mismatch", on_rank_mismatch, _ranks.ON_RANK_MISMATCH)
        if not rank_rtol >= 0:
            raise ValueError(f"rank_rtol must be >= 0, got {rank_rtol}")
        self.rank, self.world_size = _ranks.process_rank()
        #: Whether this process writes rows (False on ranks other than 0 under ``ranks="zero"``).
        self.active = not (self.world_size > 1 and ranks == "zero" and self.rank != 0)
        self._check_ranks = bool(check_ranks) and self.world_size > 1
        self._rank_rtol = float(rank_rtol)
        self._on_rank_mismatch = on_rank_mismatch

    def _setup_inactive(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None) -> None:
        """A recorder that writes nothing: it only ends the optimizer's epochs (and takes part in
        the rank check), so that this rank's optimizer state stays the same as rank 0's."""
        if not _ranks.is_instrumented(optimizer):
            raise TypeError(
                f"Recorder needs an instrumented_adam optimizer (Adam, AdamW, Adamax), got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.model = model
        self.store = None
        self.run_id = -1
        self.run_name = ""
        self.extra = None
        self.step_every = 1
        self.flush_every = 1
        self._closed = False
        self._step_offset = max(0, lineage.own_step_count(optimizer) - int(optimizer.steps_done))
        self._epoch = int(getattr(optimizer, "epochs_done", 0))
        self._epoch_start_step = int(optimizer.steps_done) + self._step_offset
        self._handle = None
        self._capture = None
        self._histograms_pending = []
        if self._sharded_combiner(optimizer) is not None:
            # Sharded: this rank's sums are part of every figure, so it captures its steps as rank 0
            # does and takes part in each flush's and epoch end's combination (writing nothing).
            self.step_every = int(getattr(self, "_inactive_step_every", 1))
            self.flush_every = int(getattr(self, "_inactive_flush_every", 100))
            self._capture = StepCapture(self.step_every, self.flush_every, self._emit)
            self._register_hook(self._on_step_inactive)

    def _bind_ranks(self, optimizer: Any) -> torch.optim.Optimizer:
        """The instrumented optimizer inside `optimizer`, noting whether its figures need combining
        across ranks (the wrapper says so for ZeRO); after `_setup_ranks`."""
        inner = _ranks.unwrap_optimizer(optimizer)
        self._combiner = _ranks.shard_combiner(optimizer, inner, self.world_size)
        return inner

    def _sharded_combiner(self, optimizer: torch.optim.Optimizer) -> "_ranks.ShardCombiner | None":
        """The combiner of this recorder (set by the constructor from the wrapper it was given;
        on the resume paths, which see the unwrapped optimizer, found from its parameters)."""
        if getattr(self, "_combiner", None) is None:
            self._combiner = _ranks.shard_combiner(optimizer, optimizer, self.world_size)
        return self._combiner

    def _on_step_inactive(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Step post-hook of a rank that writes nothing: it still captures, to join the flushes."""
        self._capture_step(optimizer)

    @staticmethod
    def _default_run_name() -> str:
        return f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"

    def _setup(
        self,
        optimizer: torch.optim.Optimizer,
        store: RunStore | str | Path,
        model: torch.nn.Module | None,
        step_every: int,
        flush_every: int,
        tensorboard: str | Path | None,
        owns_store: bool,
    ) -> None:
        optimizer = _ranks.unwrap_optimizer(optimizer)
        if not _ranks.is_instrumented(optimizer):
            raise TypeError(
                f"Recorder needs an instrumented_adam optimizer (Adam, AdamW, Adamax), got {type(optimizer).__name__}"
            )
        if not getattr(optimizer, "statistics", False):
            raise ValueError("Recorder needs an optimizer built with statistics=True")
        if int(step_every) < 1 or int(flush_every) < 1:
            raise ValueError(f"step_every and flush_every must be >= 1, got {step_every} and {flush_every}")
        other = _ATTACHED.get(optimizer)
        other = other() if other is not None else None
        if other is not None and not other._closed:
            raise RuntimeError(
                f"this {type(optimizer).__name__} already has an open recorder ({other!r}); a second one would "
                "see the epoch geometry the first consumes (an epoch step of 0). Close the first recorder, or "
                "read its rows"
            )
        self.optimizer = optimizer
        self.model = model
        self._sharded_combiner(optimizer)
        self.step_every = int(step_every)
        self.flush_every = int(flush_every)
        self._owns_store = owns_store
        self.store = store if isinstance(store, RunStore) else RunStore(store, create=True)
        self.run_id: int = -1
        self.run_name: str = ""
        self.extra: Any = None
        self._handle = None
        self._closed = False
        self._step_offset = 0  # recorded step = optimizer.steps_done + offset
        self._epoch = int(getattr(optimizer, "epochs_done", 0))  # the epoch in progress
        self._epoch_start_step = int(optimizer.steps_done)
        self._staged_metrics: dict[str, float] = {}
        self._saved_hyper: tuple[tuple[str, ...], tuple[tuple[Any, ...], ...]] | None = None  # from a checkpoint
        self._writer: RunWriter | None = None
        self._capture = StepCapture(step_every, flush_every, self._emit)
        # Histograms of the steps the optimizer took them at (histogram_every): device copies,
        # moved to the store at the next flush (no host sync in the step hook).
        self._histograms_pending: list[tuple[int, int, torch.Tensor]] = []
        self._tb = None
        self._last_heartbeat = time.monotonic()
        self._lr_rules: list[Any] = []  # learning-rate rules whose decisions are written (add_lr_rule)
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
        """Creates the run (the store gives this recorder its lease)."""
        from .. import __version__

        opt = self.optimizer
        config = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        if hyperparameters is None:
            hyperparameters = {"optimizer": type(opt).__name__, **config[0]} if config else {}
        if self._step_offset > 0:
            # The optimizer continues a torch.optim checkpoint: its θ₀ is where it was loaded.
            hyperparameters = {**hyperparameters, THETA0_ORIGIN_KEY: (
                f"the parameters when a torch.optim checkpoint at step {self._step_offset} was loaded, "
                "not the training's initialisation")}
        self.run_name = run_name or self._default_run_name()
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
            hyperparameter_columns=self._capture.hyperparameter_layout(opt.param_groups).names,
        )

    def _start_writer(self) -> None:
        self._writer = RunWriter(self.store, self.run_id, self._tb)
        self._writer.epoch = self._epoch

    def _attach(self) -> None:
        self._register_hook(self._on_step)
        _ATTACHED[self.optimizer] = weakref.ref(self)

    def _register_hook(self, hook: Any) -> None:
        """The step post-hook, and the key under which a compiled graph's `record_step` finds it."""
        self._hook_key = next(_HOOK_KEYS)
        self._hook_token = torch.zeros(1)
        _COMPILED_HOOKS[self._hook_key] = weakref.ref(self)
        self._handle = self.optimizer.register_step_post_hook(hook)

    # ---- the per-step hot path --------------------------------------------------------------
    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Step post-hook: one device op and host bookkeeping (see `capture.StepCapture`)."""
        if self._capture_step(optimizer):
            self._heartbeat()

    def _capture_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """This step's figures into the capture ring; False when traced (the graph's `record_step`
        captures when it runs)."""
        if torch.compiler.is_compiling():
            self._trace_step(optimizer)
            return False
        self._capture.capture(optimizer, optimizer.steps_done + self._step_offset, self._epoch)
        if getattr(optimizer, "histogram_every", 0):
            self._capture_histograms(optimizer)
        return True

    # Under torch.compile the hook's host bookkeeping (the ring's fill count, the pending step
    # meta, flushes to SQLite) cannot be graph ops, and traced as Python it would be guards that
    # change every step (a recompile per step). The traced hook is therefore one opaque op,
    # `record_step`, whose inputs are the statistics buffer and the step counter as the graph
    # computed them: when the compiled step runs, the op runs the eager capture on them. No guard
    # changes from step to step, so a module-global optimizer compiles with fullgraph=True.
    def _trace_step(self, optimizer: torch.optim.Optimizer) -> None:
        ia = optimizer._ia
        if ia.layout is None or ia.layout.stats is None:
            return  # nothing measured (statistics off): nothing to record
        layout = ia.layout
        prev = ia.prev_step_sumsq
        if ia.has_prev_epoch and optimizer.epoch_geometry and (prev is None or prev.shape[0] != layout.stats.shape[0]):
            prev = ia.prev_step_sumsq = optimizer._prev_sumsq_from_state()  # after a load (once)
        elif not (ia.has_prev_epoch and optimizer.epoch_geometry):
            prev = None
        _record_step(self._hook_token, layout.stats, ia.step_count, ia.active_numel, layout.groups, prev,
                     len(layout.num_params), self._hook_key)

    def _on_compiled_step(self, stats: Any, steps_done: int) -> None:
        """`_on_step` of a compiled step (called by the `record_step` op when the graph runs it)."""
        optimizer = self.optimizer
        self._capture.capture(optimizer, steps_done + self._step_offset, self._epoch, stats=stats)
        if getattr(optimizer, "histogram_every", 0):  # (a histogram step breaks the graph before this)
            self._capture_histograms(optimizer)
        if self.active:
            self._heartbeat()

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat > self.heartbeat_seconds:
            # Long stretches without a write (slow steps, a large flush_every) must not let the
            # run's lease expire while this process is alive: a requeued job could take it over.
            self._last_heartbeat = now
            try:
                self.store.heartbeat(self.run_id)  # LeaseLostError propagates: this writer must stop
            except sqlite3.OperationalError as e:  # a busy store: the next write refreshes it
                warnings.warn(f"instrumented_adam: lease heartbeat not written ({e})", RuntimeWarning)

    # ---- step histograms (the optimizer's histogram_every) -----------------------------------
    #: Histogram steps kept on the device before they are written without waiting for a flush.
    histograms_buffered: int = 16

    def _capture_histograms(self, optimizer: torch.optim.Optimizer) -> None:
        hist = optimizer.last_step_histograms(copy=True)
        if hist is None:
            return
        self._histograms_pending.append((optimizer.steps_done + self._step_offset, self._epoch, hist.counts))
        if len(self._histograms_pending) >= self.histograms_buffered:
            self._write_histograms()

    def _write_histograms(self) -> None:
        """Moves the pending histograms to the store (and the TensorBoard mirror)."""
        pending, self._histograms_pending = self._histograms_pending, []
        if not pending:
            return
        from ..core.histogram import HISTOGRAM_NAMES  # noqa: PLC0415 (the core layer, below this one)

        if self._combiner is not None:
            # Sharded: the counts of every rank's shards add up (integers, exact in float64 up to
            # 2^53 elements per bin): one all_reduce for all the pending histogram steps.
            stacked = torch.stack([counts for _, _, counts in pending])
            k, rows_, kinds, bins = stacked.shape
            (combined,) = self._combiner.reduce([(stacked.reshape(k, rows_, kinds * bins), ("count",) * (kinds * bins))])
            combined = combined.reshape(k, -1, kinds, bins).to(torch.int64)
            pending = [(step, epoch, combined[j]) for j, (step, epoch, _) in enumerate(pending)]
            if not self.active:
                return
        names = self._layer_names()
        rows = []
        for step, epoch, counts in pending:
            host = counts.cpu().numpy()
            for i in range(min(len(names), host.shape[0])):
                for k, kind in enumerate(HISTOGRAM_NAMES):
                    rows.append((step, epoch, i, names[i], kind, host[i, k]))
            if self._tb is not None:
                self._tb.log_histograms(step, names, host)
        self.store.write_histograms(self.run_id, rows)

    def _emit(self, block) -> None:
        if self._combiner is not None:
            block = self._combine_block(block)
        if self.active:
            self._writer.launch(block)

    def _combine_block(self, block: CapturedBlock) -> CapturedBlock:
        """A block of this rank's buffered rows as the whole model's: one combination (two
        collectives) for all its steps, their element counts and ‖s_{k-1}‖²."""
        parts = [(block.ring, _STEP_KINDS), (block.numel[:, None], ("sum",))]
        if block.prev_step_sumsq is not None:
            parts.append((block.prev_step_sumsq[:, None], ("sum",)))
        out = self._combiner.reduce(parts)
        groups, num_groups = self._combiner.global_groups(block.ring.device)
        prev = out[2][:, 0] if block.prev_step_sumsq is not None else None
        return CapturedBlock(out[0], out[1][:, 0], groups, num_groups, prev, block.meta, block.hyper_names)

    def _combine_epoch(self, stats: Any, geometry: Any) -> tuple[Any, Any]:
        """The last step's statistics and the epoch geometry of the whole model (one combination)."""
        parts = [(stats.values, _STEP_KINDS), (stats.numel[:, None], ("sum",))]
        if stats.prev_step_sumsq is not None:
            parts.append((stats.prev_step_sumsq[:, None], ("sum",)))
        if geometry is not None:
            parts += [(geometry.values, _EPOCH_KINDS), (geometry.numel[:, None], ("sum",))]
        out = self._combiner.reduce(parts)
        groups, num_groups = self._combiner.global_groups(stats.values.device)
        at = 2
        prev = None
        if stats.prev_step_sumsq is not None:
            prev, at = out[2][:, 0], 3
        stats = dataclasses.replace(stats, values=out[0], numel=out[1][:, 0], groups=groups, num_groups=num_groups,
                                    prev_step_sumsq=prev)
        if geometry is not None:
            geometry = dataclasses.replace(geometry, values=out[at], numel=out[at + 1][:, 0], groups=groups,
                                           num_groups=num_groups)
        return stats, geometry

    def flush(self) -> None:
        """Writes every buffered step row to the store now (waits for the device copy)."""
        if not self.active:
            if self._capture is not None:  # sharded: this rank's part of the buffered figures
                self._capture.take()
                self._write_histograms()
            return
        self._capture.take()
        if self._writer is not None:
            self._writer.drain(block=True)
        self._write_histograms()
        self._write_lr_decisions()

    # ---- learning-rate rules ----------------------------------------------------------------
    def add_lr_rule(self, rule: Any) -> None:
        """Records the decisions of a learning-rate rule (`core.lr_rules`) in the run store.

        The rule's log (`rule.pop_decisions()`) is written at every flush: each `end_epoch`,
        `save_checkpoint` and `close`. Step an epoch rule before saving that epoch's checkpoint,
        so that a resume keeps its decision (the store truncates decisions by epoch, as epoch rows).
        """
        if not hasattr(rule, "pop_decisions"):
            raise TypeError(f"{type(rule).__name__} has no decision log (pop_decisions)")
        self._lr_rules.append(rule)

    def _write_lr_decisions(self) -> None:
        rows = []
        for rule in self._lr_rules:
            for decision in rule.pop_decisions():
                row = decision.to_dict() if hasattr(decision, "to_dict") else dict(decision)
                row["step"] = int(row["step"]) + self._step_offset
                rows.append(row)
        if rows:
            self.store.write_lr_decisions(self.run_id, rows)

    # ---- metrics ----------------------------------------------------------------------------
    def _hyper_names(self) -> tuple[str, ...]:
        return self._capture.hyperparameter_layout(self.optimizer.param_groups).names

    def log_metrics(self, metrics: Mapping[str, Any] | None = None, /, *, epoch: int | None = None, **kwargs: Any) -> None:
        """Logs user metrics (train/val loss, accuracy, ...) for an epoch.

        Without `epoch` (or with the epoch in progress) they are written with that epoch's row by
        the next `end_epoch`; with an earlier epoch (e.g. a validation run after `end_epoch`),
        they are written now. A metric is logged once per epoch; a name of a built-in column is
        refused (`MetricClashError`). A loss (a name containing 'loss') that is not finite marks
        the run 'diverged'.
        """
        if not self.active:
            return
        merged = {**(metrics or {}), **kwargs}
        reserved = frozenset(self._hyper_names())
        if epoch is None or epoch == self._epoch:
            self._staged_metrics.update(RunWriter.check_metrics(merged, self._staged_metrics, self._epoch, reserved))
            return
        if epoch > self._epoch or epoch < 0:
            raise ValueError(f"epoch {epoch} is not a recorded epoch (the epoch in progress is {self._epoch})")
        values = RunWriter.check_metrics(merged, {}, epoch, reserved)
        step = self.optimizer.steps_done + self._step_offset
        if _accepts_step(self.store.write_metrics):
            # The store deletes metrics logged after a checkpoint when the run resumes from it.
            self.store.write_metrics(self.run_id, epoch, values, step=step)
        else:
            self.store.write_metrics(self.run_id, epoch, values)
        if self._tb is not None:
            self._tb.log_metrics(epoch, None, values)
        self._writer.check_losses(values, epoch, step)

    # ---- epochs -----------------------------------------------------------------------------
    @torch.no_grad()
    def end_epoch(self, **metrics: Any) -> dict[str, float]:
        """Ends the epoch: ``optimizer.end_epoch()``, then the epoch row, its layer rows and metrics.

        Keyword arguments are user metrics of the epoch (``train_loss=..., val_accuracy=...``).
        Flushes the step rows first. Returns the epoch row (with the metrics) as floats, e.g.
        for a learning-rate rule that reads ``cos_prev``.

        An epoch without a step (``end_epoch()`` before the first step, as a training script that
        evaluates at iteration 0 does, or twice in a row) records nothing and leaves the epoch
        geometry alone: it returns an empty dict with a warning; metrics passed to it are refused
        (`ValueError`), since there is no epoch row to hold them.
        """
        self._check_open()
        opt = self.optimizer
        step = opt.steps_done + self._step_offset
        if step == self._epoch_start_step:
            if metrics:
                raise ValueError(
                    f"end_epoch({', '.join(sorted(metrics))}=...) with no optimizer step since the last epoch "
                    f"(step {step}): there is no epoch to attach these metrics to. Log them after the first "
                    "step, or for a recorded epoch with log_metrics(epoch=...)"
                )
            warnings.warn(
                f"instrumented_adam: end_epoch() with no optimizer step since the last epoch (step {step}): "
                "nothing recorded, the epoch geometry is left as it was",
                RuntimeWarning,
                stacklevel=2,
            )
            return {}
        if not self.active:
            self._end_epoch_inactive(step)
            return {}
        reserved = frozenset(self._hyper_names())
        values = RunWriter.check_metrics(metrics, self._staged_metrics, self._epoch, reserved)  # before any change
        values = {**self._staged_metrics, **values}
        self.flush()
        nf = len(STEP_FIGURES)
        last_tensor = None
        last, geometry = self._epoch_statistics()
        if last is not None:
            derived = last.derived("tensor")
            last_tensor = torch.stack([derived[k] for k in STEP_FIGURES], 1).cpu().numpy()
        if geometry is not None:
            overall = geometry.derived("overall")
            per_tensor = geometry.derived("tensor")
            geo_overall = torch.stack([overall[k][0] for k in EPOCH_FIGURES]).cpu().tolist()
            geo_tensor = torch.stack([per_tensor[k] for k in EPOCH_FIGURES], 1).cpu().numpy()
        else:
            geo_overall = [math.nan] * len(EPOCH_FIGURES)
            geo_tensor = None
        if self._check_ranks:
            values[_ranks.RANK_DISAGREEMENT_METRIC] = self._compare_ranks(geo_overall, last)
        names, group0 = self._hyper_in_force()
        row: dict[str, Any] = {
            "epoch": self._epoch,
            "step": step,
            "num_steps": step - self._epoch_start_step,
            "wall_time": time.time(),
            **dict(zip(names, group0)),
            **dict(zip(EPOCH_FIGURES, geo_overall)),
        }
        layer_rows = []
        layer_names = self._layer_names()
        groups = self._combiner.global_params() if self._combiner is not None else [g["params"] for g in opt.param_groups]
        group_of = [g for g, params in enumerate(groups) for _ in params]
        numels = [p.numel() for params in groups for p in params]  # a DTensor's global size
        if self._combiner is not None and geometry is not None and self._combiner.kind == "shards":
            numels = [int(n) for n in geometry.numel.tolist()]  # FSDP1 shards: without FSDP's padding
        for i in range(len(numels)):
            geo = geo_tensor[i].tolist() if geo_tensor is not None and i < len(geo_tensor) else [math.nan] * len(EPOCH_FIGURES)
            fig = last_tensor[i].tolist() if last_tensor is not None and i < len(last_tensor) else [math.nan] * nf
            layer_rows.append((i, layer_names[i], group_of[i], numels[i], *geo, *fig))
        row = self._writer.write_epoch(row, layer_rows, values, names)
        self._writer.check_losses(values, self._epoch, step)
        self._epoch += 1
        self._epoch_start_step = step
        self._staged_metrics = {}
        return {**{k: float(v) for k, v in row.items()}, **values}

    def _epoch_statistics(self) -> tuple[Any, Any]:
        """The epoch's last step statistics and ``optimizer.end_epoch()``'s geometry, the whole
        model's under a sharded optimizer (one combination; every rank calls this at its epoch end)."""
        opt = self.optimizer
        # Before opt.end_epoch(): the last step's cos_update_prev_epoch uses this epoch's s_{k-1}.
        last = opt.last_step_statistics() if opt.steps_done > 0 else None
        geometry = opt.end_epoch() if getattr(opt, "epoch_geometry", True) else None
        if self._combiner is not None and last is not None:
            last, geometry = self._combine_epoch(last, geometry)
        return last, geometry

    def _end_epoch_inactive(self, step: int) -> None:
        """`end_epoch` of a rank that does not record: the optimizer's epoch ends as on rank 0."""
        self.flush()  # sharded: the buffered steps' combination, as rank 0's flush
        last, geometry = self._epoch_statistics()
        if self._check_ranks:
            if geometry is not None:
                overall = geometry.derived("overall")
                geo_overall = torch.stack([overall[k][0] for k in EPOCH_FIGURES]).cpu().tolist()
            else:
                geo_overall = [math.nan] * len(EPOCH_FIGURES)
            self._compare_ranks(geo_overall, last)
        self._epoch += 1
        self._epoch_start_step = step

    def _compare_ranks(self, geo_overall: list[float], last: Any) -> float:
        """The rank check of `check_ranks`: this epoch's geometry and the overall figures of its
        last step (`last`, the statistics before end_epoch), gathered from every rank and compared
        with rank 0's. (Under a sharded optimizer they are the combined figures: equal by
        construction, so the check then only confirms the ranks ended the same epochs.)"""
        values = list(geo_overall)
        if last is not None:
            overall = last.derived("overall")
            values += [float(overall[k].reshape(-1)[0]) for k in STEP_FIGURES]
        worst, offenders = _ranks.rank_disagreement(values, self._rank_rtol)
        _ranks.report_disagreement(self._epoch, worst, offenders, self._on_rank_mismatch)
        return worst

    def _hyper_in_force(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """Names and group-0 values (floats) of the hyperparameters of the last step (or, with no
        step since a resume, those the checkpoint saved; else the groups' current settings)."""
        capture = self._capture
        if capture.last_hyper is not None and capture.layout is not None:
            return capture.layout.names, tuple(_host(v) for v in capture.last_hyper[0])
        if self._saved_hyper is not None:
            names, values = self._saved_hyper
            return names, tuple(values[0])
        layout = capture.hyperparameter_layout(self.optimizer.param_groups)
        return layout.names, tuple(_host(v) for v in layout.values(self.optimizer.param_groups[0]))

    def _layer_names(self, local: bool = False) -> list[str]:
        """Parameter names by statistics row: the model's names, else ``param.<i>``.

        Under a sharded optimizer the rows are the combined ones (`ShardCombiner.names`: every
        parameter of a ZeRO wrapper, FSDP's names without its prefixes) unless `local`.
        """
        if self._combiner is not None and not local:
            return self._combiner.names(self.model)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        known: dict[int, str] = {}
        if self.model is not None:
            for name, p in self.model.named_parameters(remove_duplicate=False):
                known.setdefault(id(p), _ranks.clean_name(name))
        return [known.get(id(p), f"param.{i}") for i, p in enumerate(params)]

    @property
    def epoch(self) -> int:
        """The epoch in progress (0-based)."""
        return self._epoch

    @property
    def steps_this_epoch(self) -> int:
        """Optimizer steps since the last recorded epoch end (0: `end_epoch` would record nothing)."""
        return self.optimizer.steps_done + self._step_offset - self._epoch_start_step

    @property
    def diverged(self) -> str | None:
        """Where the run first went non-finite (its status detail), or None."""
        return self._writer.diverged if getattr(self, "_writer", None) is not None else None

    # ---- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path, model: torch.nn.Module | None = None, *, extra: Mapping[str, Any] | None = None) -> Path:
        """Saves model, optimizer, recorder position and RNG states in one file, atomically.

        Meant for epoch ends (after `end_epoch`); a mid-epoch checkpoint also carries the
        epoch's running aggregates (a few numbers, whatever the epoch's length). Before the file
        is written the store is flushed and synced to disk (`RunStore.sync`), and what it holds
        of the run (`RunStore.position`) goes into the checkpoint: a resume checks it. `extra`
        (tensors and plain containers) is stored as is, e.g. an LR scheduler's state_dict, and
        comes back from `Recorder.resume(...).extra`.
        """
        self._check_open()
        if self._combiner is not None:
            # Rank 0 holds only its shard of the model and optimizer states (FSDP's state_dict
            # would also need every rank): such a file could not resume the run. Every rank
            # raises here, so none waits in a collective for the others.
            raise RuntimeError(
                f"instrumented_adam: save_checkpoint writes rank 0's states, and under {self._combiner.description} "
                "each rank holds only its part: save the model and optimizer with a distributed checkpoint "
                "(torch.distributed.checkpoint) and keep the recorder's checkpoint_position() beside it; continue "
                "with Recorder.from_position")
        if not self.active:  # rank 0 writes the file (every rank holds the same state)
            return Path(path)
        model = model if model is not None else self.model
        self.flush()
        self.store.sync()
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
        return lineage.checkpoint_position(self)

    def checkpoint_position(self) -> dict[str, Any] | None:
        """What a checkpoint of someone else's format must carry to continue this run: the
        recorder's position (tensors and plain values; weights-only loadable). Flushes the step
        rows and syncs the store first, as `save_checkpoint` does. Give it back to
        `Recorder.from_position` after the framework restored the model and optimizer.
        None on a rank that does not record."""
        self._check_open()
        if not self.active:
            self.flush()  # sharded: rank 0's flush combines this rank's buffered steps too
            return None
        self.flush()
        self.store.sync()
        return self._position()

    @classmethod
    def from_position(
        cls,
        position: Mapping[str, Any],
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module | None = None,
        store: RunStore | str | Path | None = None,
        *,
        checkpoint: str | Path | None = None,
        tensorboard: str | Path | None = None,
        takeover: bool = False,
        on_gap: str = "refuse",
        ranks: str = "zero",
        check_ranks: bool = False,
        rank_rtol: float = 1e-9,
        on_rank_mismatch: str = "warn",
    ) -> "Recorder":
        """Continues a run from `checkpoint_position()`, once model and optimizer states have been
        restored by whoever saved them (a training framework's own checkpoint). As `resume`, the
        store then holds exactly an uninterrupted run's rows; RNG states are the framework's.
        `checkpoint`: the framework's file, recorded as the run's checkpoint."""
        rank_options = {"ranks": ranks, "check_ranks": check_ranks, "rank_rtol": rank_rtol,
                        "on_rank_mismatch": on_rank_mismatch}
        return lineage.resume_position(cls, position, optimizer, model, store, checkpoint=checkpoint,
                                       tensorboard=tensorboard, takeover=takeover, on_gap=on_gap,
                                       rank_options=rank_options)

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
        takeover: bool = False,
        on_gap: str = "refuse",
        ranks: str = "zero",
        check_ranks: bool = False,
        rank_rtol: float = 1e-9,
        on_rank_mismatch: str = "warn",
    ) -> "Recorder":
        """Continues the run a checkpoint belongs to: takes the run's lease, checks the store,
        restores model, optimizer and RNG states, deletes the run's rows beyond the checkpoint
        (one transaction) and records on.

        The store then holds exactly the rows of an uninterrupted run. `store` defaults to the
        path recorded in the checkpoint. The file is read to the CPU (`map_location`); the model
        and optimizer loads move the tensors to their parameters' devices.

        Args:
            takeover: take the run over from a writer whose lease expired (a requeued job whose
                predecessor hangs); that writer's next write then fails and writes nothing. A
                live writer is always refused (`RunLeaseError` naming it).
            on_gap: when the store lacks rows the checkpoint expects (an older copy of the file,
                transactions lost to a power cut): "refuse" (`StoreGapError`, nothing changed) or
                "mark": record the missing steps/epochs in the store's gaps (`RunStore.gaps`) and
                go on. The epoch in progress is re-derived from the checkpoint (its aggregates
                travel in it); rows of the missing range cannot be re-derived.
            ranks, check_ranks, rank_rtol, on_rank_mismatch: as for `Recorder`. A rank that does
                not record loads the checkpoint's states as rank 0 does and leaves the store alone.
        """
        rank_options = {"ranks": ranks, "check_ranks": check_ranks, "rank_rtol": rank_rtol,
                        "on_rank_mismatch": on_rank_mismatch}
        return lineage.resume(cls, checkpoint, optimizer, model, store, map_location=map_location,
                              tensorboard=tensorboard, takeover=takeover, on_gap=on_gap, rank_options=rank_options)

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
        return lineage.branch(cls, checkpoint, optimizer, model, store, run_name=run_name, overrides=overrides,
                              hyperparameters=hyperparameters, load_optimizer_state=load_optimizer_state, seed=seed,
                              map_location=map_location, **kwargs)

    # ---- lifecycle --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the recorder of run {self.run_id} is closed")

    def _release_store(self) -> None:
        if self._owns_store:
            self.store.close()

    def _detach(self) -> None:
        """Marks the recorder closed and removes its step hook (and its compiled-graph entry)."""
        self._closed = True
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            _COMPILED_HOOKS.pop(getattr(self, "_hook_key", None), None)

    def close(self, status: str = "finished") -> None:
        """Flushes, detaches the hook, marks the run `status` ('finished' or 'failed'; a run that
        diverged stays 'diverged' unless it failed) and gives up the run's lease."""
        if self._closed:
            return
        if not self.active:
            try:
                self.flush()  # sharded: rank 0's last flush combines this rank's steps too
            finally:
                self._detach()
            return
        try:
            self.flush()
        finally:
            self._detach()
            if _ATTACHED.get(self.optimizer) is not None and _ATTACHED[self.optimizer]() is self:
                del _ATTACHED[self.optimizer]
            try:
                diverged = self.diverged
                if diverged is not None and status == "finished":
                    self.store.set_status(self.run_id, "diverged", detail=diverged)
                else:
                    self.store.set_status(self.run_id, status)
                self.store.release_lease(self.run_id)
            finally:
                if self._tb is not None:
                    self._tb.close()
                self._release_store()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("failed" if exc_type is not None else "finished")

    def __repr__(self) -> str:
        if not self.active:
            return f"Recorder(inactive on rank {self.rank} of {self.world_size}, epoch {self._epoch})"
        return f"Recorder(run {self.run_id} {self.run_name!r} in {str(self.store.path)!r}, epoch {self._epoch})"


_STEP_KWARG: dict[Any, bool] = {}


def _accepts_step(method: Any) -> bool:
    """Whether the store's write_metrics takes ``step=`` (a store-side change of issue 10)."""
    func = getattr(method, "__func__", method)
    if func not in _STEP_KWARG:
        try:
            _STEP_KWARG[func] = "step" in inspect.signature(func).parameters
        except (TypeError, ValueError):
            _STEP_KWARG[func] = False
    return _STEP_KWARG[func]


__all__ = ["Recorder", "STEP_FIGURES", "EPOCH_FIGURES", "AGGREGATES", "LAYER_COLUMNS", "code_version", "StoreError"]
