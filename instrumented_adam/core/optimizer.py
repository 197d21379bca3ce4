"""Adam, AdamW and Adamax with a fused, instrumented step.

Each class subclasses its torch.optim namesake, so the constructor, defaults, validation
messages, param groups and state_dict layout are torch's own, and `isinstance(opt,
torch.optim.Adam)` holds for LR schedulers and other tooling. Only the step differs: one call
of the fused kernel per parameter group updates every tensor and, in the same pass over memory,
measures the statistics of `STAT_NAMES`.

The step itself is `core.functional` (`adam` / `adamax`): these classes keep the state, the plan
of each group's tensor lists and the statistics buffer, and call it once per group.

`differentiable=True` is accepted, as by torch.optim: such a group steps with torch's own
differentiable single-tensor math and its statistics come from `core.reference` (see
`core.functional` for the cost), so autograd can differentiate through `step()`.

Instrumentation options (keyword-only):
  statistics      per-step statistics in the kernel (default True; False runs the plain update)
  epoch_geometry  keep θ at the last epoch boundary and the previous epoch's step (and θ_0)
                  on the parameters' device, so that `end_epoch()` can measure the epoch's step
                  and each step its alignment with the previous epoch's (default True)
  epoch_buffers   how those buffers are stored: "compact" (default) keeps θ at the epoch start
                  exact and the previous epoch's step in bfloat16 (6 B/element for fp32
                  parameters); "exact" keeps all of them in the parameter's dtype. The accuracy
                  of each epoch figure per mode is stated in docs/design.md ("Epoch geometry")
  distance_from_init  keep θ_0 so that `end_epoch()` measures ‖θ − θ_0‖ (in bfloat16 when
                  compact); default: on for "exact", off for "compact" (its distance is NaN)
  histogram_every on the steps whose number is divisible by it, the kernel also counts per tensor
                  log2 histograms of |g|, |Δθ| and the effective step size in the same pass
                  (`last_step_histograms()`, `core.histogram`); 0 (default) never
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from . import functional
from ._ops import NUM_STATS, epoch_geometry, sum_of_squares
from .histogram import HISTOGRAM_BINS, HISTOGRAM_KINDS, HISTOGRAM_NAMES
from .stats import EPOCH_COLUMNS, EpochGeometry, StepStatistics

# Instrumentation state kept per parameter (besides torch's own keys); saved in state_dict.
EPOCH_START_KEY = "epoch_start_param"  # θ at the last epoch boundary (θ_end(k-1))
PREV_EPOCH_STEP_KEY = "prev_epoch_step"  # s_{k-1} = θ_end(k-1) - θ_end(k-2)
INITIAL_PARAM_KEY = "initial_param"  # θ_0, where instrumentation began
INSTRUMENTATION_KEY = "instrumentation"  # top-level state_dict entry with the counters

#: Values of the `epoch_buffers` option.
EPOCH_BUFFER_MODES = ("compact", "exact")
#: Storage type of the compact mode's previous-epoch step and θ_0 (a cosine needs three digits;
#: bf16 keeps fp32's range, so a small step never underflows as it could in fp16).
COMPACT_EPOCH_DTYPE = torch.bfloat16

# Elements per chunk when the epoch geometry converts to float64 (bounds the temporary memory).
_EPOCH_CHUNK = 1 << 22


def _is_dense(t: Tensor) -> bool:
    """True when t's elements fill its storage span exactly (any order): the kernel can walk it."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _sumsq_f64(t: Tensor) -> Tensor:
    """Σ t² in float64, chunked like end_epoch (so a recomputation gives the same bits)."""
    flat = _flat(t)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for lo in range(0, flat.numel(), _EPOCH_CHUNK):
        chunk = flat[lo : lo + _EPOCH_CHUNK].double()
        total = total + chunk.dot(chunk)
    return total


def _flat(t: Tensor) -> Tensor:
    """t as one dimension in storage order: a view whenever t is dense, so writes reach t.

    `reshape(-1)` copies a dense but non-contiguous tensor (transposed, channels_last), and
    end_epoch writes θ_end and s_k through these views. A parameter and its epoch buffers share
    their strides (they are created with preserve_format and re-laid out on load), so the same
    storage order pairs the same elements. A non-dense parameter (a strided slice) is only read:
    its copy comes in logical order, which is the order of its (then contiguous) buffers.
    """
    t = _real(t)
    if t.is_contiguous():
        return t.view(-1)
    if _is_dense(t):
        order = sorted(range(t.dim()), key=lambda d: (t.stride(d), t.shape[d]), reverse=True)
        return t.permute(order).view(-1)
    return t.reshape(-1)


def _native_epoch(p: Tensor, state: dict) -> bool:
    """Whether the epoch ops (CPU, one parallel pass) handle this parameter.

    The rest (other devices, non-dense parameters, buffers in another layout) takes the chunked
    torch path. The choice depends only on the parameter and its buffers' layout, and is the same
    in end_epoch and in the recomputation of ‖s_{k-1}‖² after a load, so both give the same bits.
    """
    if p.device.type != "cpu" or not _is_dense(p):
        return False
    return all(
        state[k].stride() == p.stride() for k in (EPOCH_START_KEY, INITIAL_PARAM_KEY, PREV_EPOCH_STEP_KEY) if k in state
    )


def _host_list_to(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small list as a tensor on `device` without a blocking host-to-device copy.

    `torch.tensor(values, device="cuda")` copies synchronously (set_sync_debug_mode("error")
    flags it and it cannot run under graph capture); from pinned memory the copy is queued on
    the stream like any kernel. The pinned source stays alive until the copy ran (the caching
    host allocator records the stream use).
    """
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _real(t: Tensor) -> Tensor:
    """Complex tensors are updated as pairs of reals, as torch.optim does."""
    return torch.view_as_real(t) if t.is_complex() else t


try:  # torch.distributed may be left out of a build (some macOS and mobile wheels)
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    _DTensor = None


def _padding(p: Tensor) -> int:
    """Elements at the end of an FSDP1 FlatParameter's local shard that belong to no parameter.

    FSDP pads a flat parameter so that it divides into equal shards; the padding is zero and its
    gradient is zero, so the update leaves it at zero. Stepping it anyway would add its elements
    to the statistics (an effective step size of lr/(bc1·eps) each, and to the element counts):
    the kernel is given the shard without it.
    """
    if not getattr(p, "_is_flat_param", False):
        return 0
    return int(getattr(p, "_shard_numel_padded", 0) or 0)


def _local(t: Tensor, padding: int = 0) -> Tensor:
    """The part of a (sharded) parameter, gradient or state tensor that this rank steps.

    A DTensor (FSDP2's `fully_shard` parameters, their gradients and the state created from
    them) gives its local shard; an FSDP1 FlatParameter's shard (1-D) and its companions give
    their first numel − `padding` elements (see `_padding`); anything else is itself. The kernels
    are plain ops without a DTensor rule: they run on these local tensors, which share storage
    with the originals, so the in-place update reaches them (torch's fused Adam does the same
    through DTensor's dispatch). The statistics are then those of this rank's shard; the recorder
    combines them across ranks (telemetry.ranks.ShardCombiner).
    """
    if _DTensor is not None and isinstance(t, _DTensor):
        return t.to_local()
    if padding:
        return t.view(-1)[: t.numel() - padding]
    return t


def _is_sharded(p: Tensor) -> bool:
    """Whether the kernel steps a local view of p rather than p itself (see `_local`)."""
    return (_DTensor is not None and isinstance(p, _DTensor)) or _padding(p) > 0


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state: the distinct storages behind `optimizer.state`'s tensors.

    Any `torch.optim.Optimizer` (ours or torch's), so that the two can be compared; tensors that
    share a storage count once. Parameters and gradients are not optimizer state and do not count.
    """
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


@dataclass
class _GroupPlan:
    """The kernel's argument lists for one param group, rebuilt only when something changes."""

    key: tuple  # which params had a gradient, plus the settings the lists depend on
    indices: list[int]  # positions (within the group) of the params in the call
    params: list[Tensor]
    exp_avgs: list[Tensor]
    second_moments: list[Tensor]
    max_second_moments: list[Tensor]
    prev_epoch_steps: list[Tensor]
    state_steps: list[Tensor]
    stat_rows: list[int]  # empty when every param of the group is in the call
    # Positions (within the call) of params that are not dense: updated through a dense copy.
    relayout: list[int] = field(default_factory=list)
    strides: list[tuple[int, ...]] = field(default_factory=list)  # of params (their real views)
    has_complex: bool = False
    # Some params are sharded (FSDP2 DTensors, padded FSDP1 flat params): `params` holds what the
    # kernel steps (see _local), looked up again at each step, since FSDP may give a parameter new
    # storage (a reshard after a state_dict load); their gradients are looked up likewise.
    distributed: bool = False
    pads: list[int] = field(default_factory=list)  # per stepped param, its FSDP1 padding (_padding)
    # The same lists held on the C++ side (csrc/step_plan.cpp), for the common case: every param of
    # the group stepping, plain dense CPU tensors. None: the step passes the lists from Python.
    native: Any = None


@dataclass
class _Layout:
    """Rows of the statistics buffer: one per parameter, groups in order."""

    num_params: tuple[int, ...]  # params per group
    device: torch.device
    offsets: list[int]
    numel: Tensor
    groups: Tensor
    stats: Tensor | None  # [rows, NUM_STATS] float64, filled by each step
    histograms: Tensor | None = None  # [rows, HISTOGRAM_KINDS, HISTOGRAM_BINS] int64, on histogram steps


@dataclass(frozen=True)
class StepHistograms:
    """The histograms of one step, one row per parameter (see `core.histogram` for the bins).

    counts: [rows, HISTOGRAM_KINDS, HISTOGRAM_BINS] int64 on the parameters' device, kinds in
    `names` order (|g|, |Δθ|, effective step size); a parameter without a gradient has zeros.
    `groups` gives each row's param group; `step` the optimizer step they were taken at.
    """

    counts: Tensor
    groups: Tensor
    step: int
    names: tuple[str, ...] = HISTOGRAM_NAMES

    def kind(self, name: str) -> Tensor:
        """The [rows, HISTOGRAM_BINS] counts of one histogram (`grad_abs`, `update_abs`, `eff_lr`)."""
        if name not in self.names:
            raise KeyError(f"unknown histogram {name!r}; known: {', '.join(self.names)}")
        return self.counts[:, self.names.index(name)]

    def overall(self) -> Tensor:
        """The [HISTOGRAM_KINDS, HISTOGRAM_BINS] counts over every parameter."""
        return self.counts.sum(dim=0)


class _Bookkeeping:
    """The instrumentation's mutable bookkeeping, kept in a plain object beside the optimizer.

    Inside a torch.compile region Dynamo models a torch.optim.Optimizer specially and silently
    drops attribute assignments made on it (torch 2.13: `opt.x = ...` in a compiled step is lost
    after the graph runs), while it replays assignments on plain objects. Everything step()
    changes besides `state` therefore lives here, so a compiled step keeps the counters, the
    statistics buffer and the plan cache.
    """

    def __init__(self, steps_done: int = 0, epochs_done: int = 0, steps_at_epoch_end: int = 0) -> None:
        self.plans: dict[int, _GroupPlan] = {}
        # steps_done when end_epoch() last closed an epoch (-1: unknown, from an older checkpoint)
        self.steps_at_epoch_end = steps_at_epoch_end
        self.layout: _Layout | None = None
        # step() calls so far, as a 0-d int64 CPU tensor incremented in place: under torch.compile
        # a Python int that step() changes is a guard that fails at every step (a recompile per
        # step, FailOnRecompileLimitHit with fullgraph=True), while an in-place add on a tensor is
        # one node of the graph. Exact (int64), unlike a float32 counter. One element, not 0-d: with
        # a 0-d int64 counter mutated in the graph, torch 2.13's inductor CPU code corrupted the heap
        # in the compiled SGD step of tests/test_classic_statistics.py (dampening and weight decay).
        self.step_count = torch.full((1,), int(steps_done), dtype=torch.int64)
        self.epochs_done = epochs_done  # end_epoch() calls so far
        # epochs_done > 0, kept as a bool: the step branches on it, and under torch.compile an int
        # counter that changes becomes symbolic, which Dynamo (2.13) fails to compare in a tuple.
        self.has_prev_epoch = epochs_done > 0
        self.prev_step_sumsq: Tensor | None = None  # ‖s_{k-1}‖² per parameter row
        # Elements per statistics row that took part in the last step (0 for a parameter without
        # a gradient): the per-element means divide by these.
        self.active_numel: Tensor | None = None
        self.histogram_step = 0  # steps_done of the last step that took histograms (0: none yet)

    @property
    def steps_done(self) -> int:
        return int(self.step_count)

    @steps_done.setter
    def steps_done(self, value: int) -> None:
        self.step_count.fill_(int(value))


class _Instrumented:
    """The fused instrumented step, for a torch.optim Adam-family class placed after it."""

    _second_moment_key = "exp_avg_sq"
    #: torch.optim's message for a sparse gradient (Adam and AdamW share Adam's).
    _sparse_message = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def __init__(self, *args: Any, statistics: bool = True, epoch_geometry: bool = True,
                 epoch_buffers: str = "compact", distance_from_init: bool | None = None, histogram_every: int = 0,
                 **kwargs: Any) -> None:
        if epoch_buffers not in EPOCH_BUFFER_MODES:
            raise ValueError(f"Invalid epoch_buffers value: {epoch_buffers!r} (expected 'compact' or 'exact')")
        if distance_from_init is not None and not isinstance(distance_from_init, bool):
            raise ValueError(f"Invalid distance_from_init value: {distance_from_init!r} (expected a bool or None)")
        if isinstance(histogram_every, bool) or not isinstance(histogram_every, int) or histogram_every < 0:
            raise ValueError(f"Invalid histogram_every value: {histogram_every!r} (an int >= 0; 0 turns histograms off)")
        if histogram_every and not statistics:
            raise ValueError("instrumented_adam: histogram_every needs statistics=True (histograms are taken on "
                             "statistics steps)")
        self._ia = _Bookkeeping()
        super().__init__(*args, **kwargs)
        self.statistics = bool(statistics)
        self.epoch_geometry = bool(epoch_geometry)
        self.histogram_every = int(histogram_every)
        self.epoch_buffers = epoch_buffers
        self.distance_from_init = epoch_buffers == "exact" if distance_from_init is None else distance_from_init

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler reads this. The kernel unscales gradients and skips inf steps itself (GradScaler
        # passes grad_scale / found_inf instead of synchronising), like torch's fused optimizers;
        # torch's differentiable math does not, so then GradScaler unscales first, as for torch.optim.
        return not any(group.get("differentiable") for group in self.param_groups)

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value: bool) -> None:
        # torch's __init__ sets it for fused=True; here it follows from the groups instead.
        pass

    # ---- bookkeeping (see _Bookkeeping) -----------------------------------------------------
    @property
    def steps_done(self) -> int:
        """step() calls so far (an exact integer, unlike a float32 counter)."""
        return self._ia.steps_done

    @steps_done.setter
    def steps_done(self, value: int) -> None:
        self._ia.steps_done = int(value)

    @property
    def epochs_done(self) -> int:
        """end_epoch() calls so far."""
        return self._ia.epochs_done

    @epochs_done.setter
    def epochs_done(self, value: int) -> None:
        self._ia.epochs_done = int(value)
        self._ia.has_prev_epoch = self._ia.epochs_done > 0

    @property
    def _layout(self) -> _Layout | None:
        # Read by the recorder to reach the live statistics buffer without a copy.
        return self._ia.layout

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim pickles only defaults/state/param_groups; a copy (copy.deepcopy, pickle,
        # multiprocessing) also needs the instrumentation settings and counters. Buffers and
        # plans are rebuilt on the next step.
        state = super().__getstate__()
        state["statistics"] = self.statistics
        state["epoch_geometry"] = self.epoch_geometry
        state["histogram_every"] = self.histogram_every
        state["epoch_buffers"] = self.epoch_buffers
        state["distance_from_init"] = self.distance_from_init
        state["_ia"] = _Bookkeeping(self._ia.steps_done, self._ia.epochs_done, self._ia.steps_at_epoch_end)
        return state

    # ---- structure --------------------------------------------------------------------------
    def _functional_step(self, group: dict, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                         second_moments: list[Tensor], max_second_moments: list[Tensor],
                         state_steps: list[Tensor], **kwargs: Any) -> None:
        """The family's `core.functional` step with the group's hyperparameters."""
        beta1, beta2 = group["betas"]
        functional.adam(params, grads, exp_avgs, second_moments, max_second_moments, state_steps,
                        lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                        weight_decay=group["weight_decay"], amsgrad=bool(group.get("amsgrad", False)),
                        maximize=bool(group.get("maximize", False)),
                        decoupled_weight_decay=bool(group.get("decoupled_weight_decay", False)), **kwargs)

    def _invalidate(self) -> None:
        self._ia.plans = {}
        self._ia.layout = None
        self._ia.prev_step_sumsq = None  # recomputed from the state when next needed
        self._ia.active_numel = None
        self._ia.histogram_step = 0  # the histograms buffer goes with the layout

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if "_ia" in self.__dict__:  # not while torch's __init__ adds the first groups
            self._invalidate()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_ia" not in self.__dict__:
            self._ia = _Bookkeeping()
        if "histogram_every" not in self.__dict__:  # pickled before histograms existed
            self.histogram_every = 0
        if "epoch_buffers" not in self.__dict__:  # pickled before the option existed: exact buffers
            self.epoch_buffers, self.distance_from_init = "exact", True
        self._invalidate()

    def _get_layout(self) -> _Layout:
        num_params = tuple(len(g["params"]) for g in self.param_groups)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        device = first.device if first is not None else torch.device("cpu")
        layout = self._ia.layout
        if layout is not None and layout.num_params == num_params and layout.device == device:
            if (layout.stats is not None or not self.statistics) and (
                layout.histograms is not None or not getattr(self, "histogram_every", 0)
            ):
                return layout
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(
                f"instrumented_adam: all parameters must be on one device, got {sorted(map(str, devices))}; "
                "use one optimizer per device"
            )
        offsets, start = [], 0
        for n in num_params:
            offsets.append(start)
            start += n
        all_params = [p for g in self.param_groups for p in g["params"]]
        # Per-element means divide by this rank's elements (a DTensor's local shard, not its global size).
        numel = _host_list_to([float(_local(p, _padding(p)).numel()) for p in all_params], torch.float64, device)
        groups = _host_list_to([i for i, n in enumerate(num_params) for _ in range(n)], torch.long, device)
        stats = torch.zeros(start, NUM_STATS, dtype=torch.float64, device=device) if self.statistics else None
        histograms = None
        if self.statistics and getattr(self, "histogram_every", 0):  # an older pickle has no attribute
            histograms = torch.zeros(start, HISTOGRAM_KINDS, HISTOGRAM_BINS, dtype=torch.int64, device=device)
        layout = self._ia.layout = _Layout(num_params, device, offsets, numel, groups, stats, histograms)
        self._ia.plans = {}
        self._ia.prev_step_sumsq = None  # rows changed: recomputed from the state when needed
        self._ia.active_numel = None
        return layout

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if len(state) == 0:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(self._sparse_message)
            # torch's fused layout: a float32 step on the parameter's device. A differentiable group
            # takes the dtype torch.optim's differentiable path creates (float64 under a float64
            # default dtype), since torch's math computes the bias corrections in the step's dtype:
            # the same dtype gives the same update and the same gradients through it.
            step_dtype = torch.float32
            if group.get("differentiable") and torch.get_default_dtype() == torch.float64:
                step_dtype = torch.float64
            state["step"] = torch.zeros((), dtype=step_dtype, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state[self._second_moment_key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            missing = [k for k in ("step", "exp_avg", self._second_moment_key) if k not in state]
            if missing:
                raise ValueError(f"instrumented_adam: the state of a parameter lacks {missing}: it was not saved by {type(self).__name__}")
            step = state["step"]
            if not torch.is_tensor(step):
                state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
            elif step.device != p.device:  # e.g. a checkpoint of torch's non-fused Adam on CUDA
                state["step"] = step.to(device=p.device, dtype=torch.float32)
            self._match_layout(p, state)
        if group.get("amsgrad") and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if self.epoch_geometry:
            if EPOCH_START_KEY not in state:
                state[EPOCH_START_KEY] = p.detach().clone(memory_format=torch.preserve_format)
                if self.distance_from_init:
                    state[INITIAL_PARAM_KEY] = p.detach().to(self._epoch_dtype(p), memory_format=torch.preserve_format,
                                                             copy=True)
            if self._ia.has_prev_epoch and PREV_EPOCH_STEP_KEY not in state:
                state[PREV_EPOCH_STEP_KEY] = self._new_prev_step(p)
            self._conform_epoch_buffers(p, state)
        return state

    # ---- epoch buffers (epoch_buffers / distance_from_init) ---------------------------------
    def _epoch_dtype(self, p: Tensor) -> torch.dtype:
        """Storage type of p's previous-epoch step and θ_0: bf16 when compact (real parameters)."""
        if getattr(self, "epoch_buffers", "exact") == "compact" and p.is_floating_point():
            return COMPACT_EPOCH_DTYPE
        return p.dtype

    def _new_prev_step(self, p: Tensor) -> Tensor:
        return torch.zeros_like(p, dtype=self._epoch_dtype(p), memory_format=torch.preserve_format)

    def _conform_epoch_buffers(self, p: Tensor, state: dict) -> None:
        """Brings loaded epoch buffers to this optimizer's mode (torch's load casts them to p's dtype).

        exact → compact rounds the previous step (and θ_0) to bf16; compact → exact widens them
        exactly. Without distance_from_init θ_0 is dropped; with it and none saved (a compact
        checkpoint), θ_0 is the parameters at load time, as after a torch.optim checkpoint.
        """
        dtype = self._epoch_dtype(p)
        prev = state.get(PREV_EPOCH_STEP_KEY)
        if prev is not None and prev.dtype != dtype:
            state[PREV_EPOCH_STEP_KEY] = prev.to(dtype, memory_format=torch.preserve_format)
        if not self.distance_from_init:
            state.pop(INITIAL_PARAM_KEY, None)
        elif EPOCH_START_KEY in state:
            initial = state.get(INITIAL_PARAM_KEY)
            if initial is None:
                state[INITIAL_PARAM_KEY] = p.detach().to(dtype, memory_format=torch.preserve_format, copy=True)
            elif initial.dtype != dtype:
                state[INITIAL_PARAM_KEY] = initial.to(dtype, memory_format=torch.preserve_format)

    @staticmethod
    def _match_layout(p: Tensor, state: dict) -> None:
        """Gives loaded state tensors the memory layout of their parameter.

        The kernel walks a parameter and its state in storage order, so they must share strides.
        A checkpoint may hold them in another layout (saved from a contiguous model, loaded into a
        channels_last or transposed one): copy those into the layout zeros_like(p) would have.
        (torch's fused kernel walks them as they are, pairing the wrong elements.)
        """
        for key, value in list(state.items()):
            if key == "step" or not torch.is_tensor(value) or value.shape != p.shape or value.numel() == 0:
                continue
            target = torch.empty_like(p, dtype=value.dtype, memory_format=torch.preserve_format)
            if value.stride() != target.stride():
                state[key] = target.copy_(value)

    def _make_plan(self, group: dict, key: tuple, indices: list[int], num_params: int) -> _GroupPlan:
        params, exp_avgs, seconds, maxes, prevs, steps, relayout = [], [], [], [], [], [], []
        amsgrad = bool(group.get("amsgrad", False))
        track_prev = self.statistics and self.epoch_geometry and self._ia.has_prev_epoch
        distributed = False
        pads = []
        for pos, i in enumerate(indices):
            p = group["params"][i]
            state = self._init_state(p, group)
            distributed |= _is_sharded(p)
            pad = _padding(p)
            pads.append(pad)
            lp = _local(p, pad)
            if not lp.is_complex() and lp.numel() > 0 and not _is_dense(lp):
                relayout.append(pos)
            params.append(_real(lp))
            exp_avgs.append(_real(_local(state["exp_avg"], pad)))
            seconds.append(_real(_local(state[self._second_moment_key], pad)))
            if amsgrad:
                maxes.append(_real(_local(state["max_exp_avg_sq"], pad)))
            if track_prev:
                prevs.append(_real(_local(state[PREV_EPOCH_STEP_KEY], pad)))
            steps.append(state["step"])
        rows = [] if len(indices) == num_params else list(indices)
        has_complex = any(group["params"][i].is_complex() for i in indices)
        native = None
        if (params and len(indices) == num_params and not relayout and not has_complex and not distributed
                and params[0].device.type == "cpu" and not torch.compiler.is_compiling()):
            native = torch.classes.instrumented_adam.AdamPlan(params, exp_avgs, seconds, maxes, prevs, steps)
        return _GroupPlan(key, indices, params, exp_avgs, seconds, maxes, prevs, steps, rows, relayout,
                          [t.stride() for t in params], has_complex, distributed, pads, native)

    def _algorithm(self, group: dict) -> functional.Algorithm:
        """The op's update rule for this group."""
        return functional.Algorithm.ADAMW if group.get("decoupled_weight_decay", False) else functional.Algorithm.ADAM

    def _native_step(self, group: dict, plan: _GroupPlan, stats: Tensor | None, histograms: Tensor | None,
                     grad_scale: Tensor | None, found_inf: Tensor | None) -> bool:
        """The group's step through its C++ plan; False (nothing changed) when the general path must
        take it: a dispatch or function mode is active, a gradient is missing, sparse or in another
        layout, or the op rejected the call (the general path then raises the op's error)."""
        if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
            return False
        amsgrad = bool(group.get("amsgrad", False))
        if amsgrad != plan.key[1]:
            return False
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        functional._check_hyperparameters(lr, beta1, beta2, eps, weight_decay)
        lr_tensor = lr if isinstance(lr, Tensor) else None
        try:
            return plan.native.step(int(self._algorithm(group)), 0.0 if lr_tensor is not None else float(lr), lr_tensor,
                                    float(beta1), float(beta2), float(weight_decay), float(eps), amsgrad,
                                    bool(group.get("maximize", False)), grad_scale, found_inf, stats, histograms)
        except RuntimeError:
            return False

    # ---- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs a single optimization step (and measures it).

        Works inside torch.compile (also with fullgraph=True): Dynamo traces this method into the
        graph, with the fused op as one node (its fake kernel is in _ops.py). The plan cache and the
        statistics buffer are built on the first compiled call, so expect a recompile after it and
        after the first end_epoch() (the previous-epoch dot turns on); the step counter is a
        tensor the graph increments, so steps do not recompile. Hyperparameters that a scheduler
        changes every step (lr, betas; as Python floats or tensors) do not recompile on CPU either:
        under compile the step's scalars reach the kernel as a tensor input (one recompile when a
        float first changes, after which Dynamo keeps it symbolic). On CUDA pass lr as a tensor.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layout = self._get_layout()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        ia = self._ia
        replanned = False
        # histogram_every: the steps whose number (counted from 1) it divides also take histograms.
        every = getattr(self, "histogram_every", 0)
        take_histograms = bool(every) and layout.histograms is not None and (ia.steps_done + 1) % every == 0
        for gi, group in enumerate(self.param_groups):
            replanned |= self._step_group(gi, group, layout, grad_scale, found_inf, take_histograms)
        if replanned or ia.active_numel is None:
            # Which parameters took part changed: per-element means count only their elements.
            stepped = [set(ia.plans[gi].indices) if gi in ia.plans else set() for gi in range(len(self.param_groups))]
            active = [float(_local(p, _padding(p)).numel()) if i in stepped[gi] else 0.0
                      for gi, g in enumerate(self.param_groups) for i, p in enumerate(g["params"])]
            ia.active_numel = _host_list_to(active, torch.float64, layout.device)
        ia.step_count.add_(1)
        if take_histograms:  # (histogram_every > 0 reads the CPU step counter on the host)
            ia.histogram_step = ia.steps_done
        return loss

    def _step_group(self, gi: int, group: dict, layout: _Layout, grad_scale, found_inf,
                    take_histograms: bool = False) -> bool:
        """One kernel call for the group; True when its plan had to be (re)built."""
        histograms = None
        if take_histograms:
            start = layout.offsets[gi]
            histograms = layout.histograms[start : start + len(group["params"])]
        if group.get("differentiable"):
            return self._step_group_differentiable(gi, group, layout, grad_scale, found_inf, histograms)
        params = group["params"]
        plan = self._ia.plans.get(gi)
        if plan is not None and plan.native is not None and not torch.compiler.is_compiling():
            start = layout.offsets[gi]
            stats = layout.stats[start : start + len(params)] if layout.stats is not None else None
            if self._native_step(group, plan, stats, histograms, grad_scale, found_inf):
                return False
        grads = [p.grad for p in params]
        has_grad = tuple(g is not None for g in grads)
        key = (has_grad, bool(group.get("amsgrad", False)), self._ia.has_prev_epoch)
        replanned = plan is None or plan.key != key
        if replanned:
            indices = [i for i, h in enumerate(has_grad) if h]
            plan = self._ia.plans[gi] = self._make_plan(group, key, indices, len(params))
        if not plan.indices:  # no parameter of the group has a gradient: nothing to step
            if layout.stats is not None:
                start = layout.offsets[gi]
                layout.stats[start : start + len(params)].zero_()
            if histograms is not None:
                histograms.zero_()
            return replanned
        call_grads = grads if len(plan.indices) == len(params) else [grads[i] for i in plan.indices]
        call_params = plan.params
        if plan.distributed:  # FSDP: the kernel steps the local shards (see _local)
            call_grads = [_local(g, pad) for g, pad in zip(call_grads, plan.pads)]
            call_params = [_real(_local(params[i], pad)) for i, pad in zip(plan.indices, plan.pads)]
        copies: list[tuple[int, Tensor, Tensor]] = []
        if plan.has_complex:
            call_grads = [torch.view_as_real(g) if g.is_complex() else g for g in call_grads]
        stats = None
        if layout.stats is not None:
            start = layout.offsets[gi]
            stats = layout.stats[start : start + len(params)]
        if not plan.relayout and not torch.compiler.is_compiling():
            # The op checks every gradient's strides (and everything else) before it mutates
            # anything, so the common case -- every gradient in its parameter's layout -- goes
            # straight to it: no Python stride comparison per tensor (a third of the step's fixed
            # cost for 1000 small tensors). A rejected call changed nothing and is retried below
            # after the mismatches are sorted out (a traced step keeps the explicit checks).
            try:
                self._functional_step(group, call_params, call_grads, plan.exp_avgs, plan.second_moments,
                                      plan.max_second_moments, plan.state_steps,
                                      prev_epoch_steps=plan.prev_epoch_steps, stats=stats, stat_rows=plan.stat_rows,
                                      grad_scale=grad_scale, found_inf=found_inf,
                                      **({"histograms": histograms} if histograms is not None else {}))
                return replanned
            except RuntimeError:
                call_grads = list(call_grads)
        # The kernel walks storage linearly: a gradient must have its parameter's layout. One
        # cached-stride comparison per gradient on the hot path; anything else (a sparse gradient,
        # whose strides never match, or another layout) is sorted out only for the mismatches.
        try:
            mismatched = [pos for pos, (g, strides) in enumerate(zip(call_grads, plan.strides)) if g.stride() != strides]
        except RuntimeError:  # a layout without strides
            mismatched = list(range(len(call_grads)))
        for pos in mismatched:
            g = call_grads[pos]
            if g.layout != torch.strided:
                raise RuntimeError(self._sparse_message)
            if pos in plan.relayout or g.numel() == 0:
                continue
            dense = torch.empty_like(call_params[pos])
            dense.copy_(g)
            copies.append((pos, g, dense))
            call_grads[pos] = dense
        targets = call_params  # the tensors a relaid-out parameter's update is copied back into
        if plan.relayout:
            call_params = list(call_params)
            for pos in plan.relayout:
                original = call_params[pos]
                call_params[pos] = original.contiguous()
                grad = call_grads[pos]
                call_grads[pos] = grad.contiguous()
                copies.append((pos, grad, call_grads[pos]))
        self._functional_step(group, call_params, call_grads, plan.exp_avgs, plan.second_moments,
                              plan.max_second_moments, plan.state_steps, prev_epoch_steps=plan.prev_epoch_steps,
                              stats=stats, stat_rows=plan.stat_rows, grad_scale=grad_scale, found_inf=found_inf,
                              **({"histograms": histograms} if histograms is not None else {}))
        for pos in plan.relayout:
            targets[pos].copy_(call_params[pos])
        if grad_scale is not None:  # the kernel unscaled the gradient copies: write them back
            for pos, original, dense in copies:
                original.copy_(dense)
        return replanned

    def _step_group_differentiable(self, gi: int, group: dict, layout: _Layout, grad_scale, found_inf,
                                   histograms: Tensor | None = None) -> bool:
        """A differentiable=True group: torch's differentiable math through `core.functional`.

        The tensor lists are gathered from the state at every step, not planned: meta-learning
        code often replaces state tensors between steps (torch's own differentiable tests do), and
        the parameters and state are passed as they are (complex, any layout), since torch's
        single-tensor math takes them so.
        """
        params = group["params"]
        has_grad = tuple(p.grad is not None for p in params)
        key = ("differentiable", has_grad)
        plan = self._ia.plans.get(gi)
        replanned = plan is None or plan.key != key
        indices = [i for i, h in enumerate(has_grad) if h]
        if replanned:  # only which parameters step matters here (per-element means count them)
            plan = self._ia.plans[gi] = _GroupPlan(key, indices, [], [], [], [], [], [], [])
        stats = None
        if layout.stats is not None:
            start = layout.offsets[gi]
            stats = layout.stats[start : start + len(params)]
        if not indices:
            if stats is not None:
                stats.zero_()
            if histograms is not None:
                histograms.zero_()
            return replanned
        amsgrad = bool(group.get("amsgrad", False))
        track_prev = self.statistics and self.epoch_geometry and self._ia.has_prev_epoch
        call_params, grads, exp_avgs, seconds, maxes, prevs, steps = [], [], [], [], [], [], []
        for i in indices:
            p = params[i]
            if p.grad.layout != torch.strided:
                raise RuntimeError(self._sparse_message)
            state = self._init_state(p, group)
            call_params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            seconds.append(state[self._second_moment_key])
            if amsgrad:
                maxes.append(state["max_exp_avg_sq"])
            if track_prev:
                prevs.append(state[PREV_EPOCH_STEP_KEY])
            steps.append(state["step"])
        # As torch.optim's step (_use_grad_for_differentiable): autograd records the step when the
        # optimizer was built with differentiable=True.
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            self._functional_step(group, call_params, grads, exp_avgs, seconds, maxes, steps, prev_epoch_steps=prevs,
                                  stats=stats, stat_rows=[] if len(indices) == len(params) else indices,
                                  grad_scale=grad_scale, found_inf=found_inf,
                                  has_complex=any(p.is_complex() for p in call_params), differentiable=True,
                                  **({"histograms": histograms} if histograms is not None else {}))
        return replanned

    # ---- statistics -------------------------------------------------------------------------
    def last_step_statistics(self, copy: bool = True) -> StepStatistics:
        """The statistics of the last step, one row per parameter (no host sync).

        Args:
            copy: True (default) returns a snapshot. False returns a view of the live buffer,
                which the next step overwrites: for callers that copy it themselves right away
                (the recorder's per-step hook), saving an allocation and a copy per step.
        """
        ia = self._ia
        layout = ia.layout
        if not self.statistics:
            raise RuntimeError("instrumented_adam: this optimizer was built with statistics=False")
        if layout is None or layout.stats is None or ia.steps_done == 0 or ia.active_numel is None:
            raise RuntimeError("instrumented_adam: no step has been taken yet")
        prev_step_sumsq = None
        if ia.has_prev_epoch and self.epoch_geometry:
            if ia.prev_step_sumsq is None or ia.prev_step_sumsq.shape[0] != layout.stats.shape[0]:
                ia.prev_step_sumsq = self._prev_sumsq_from_state()  # after a load or a new group
            prev_step_sumsq = ia.prev_step_sumsq
        return StepStatistics(
            values=layout.stats.clone() if copy else layout.stats,
            numel=ia.active_numel,
            groups=layout.groups,
            num_groups=len(layout.num_params),
            names=None,
            prev_step_sumsq=prev_step_sumsq,
            step=ia.steps_done,
        )

    def last_step_histograms(self, copy: bool = True) -> StepHistograms | None:
        """The histograms of the last step, or None when the last step took none (no host sync).

        Steps whose number is divisible by `histogram_every` take them (`core.histogram` defines
        the bins); built with histogram_every=0 this raises.

        Args:
            copy: True (default) returns a snapshot; False a view of the live buffer, which the
                next histogram step overwrites.
        """
        if not getattr(self, "histogram_every", 0):
            raise RuntimeError("instrumented_adam: this optimizer was built with histogram_every=0 (no histograms)")
        ia = self._ia
        layout = ia.layout
        if layout is None or layout.histograms is None or ia.histogram_step == 0 or ia.histogram_step != ia.steps_done:
            return None
        return StepHistograms(counts=layout.histograms.clone() if copy else layout.histograms, groups=layout.groups,
                              step=ia.steps_done)

    @staticmethod
    def _epoch_row_torch(p: Tensor, state: dict, zero: Tensor,
                         prev_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """end_epoch for one parameter with torch ops (any device or layout), chunked in float64.

        Returns its EPOCH_COLUMNS row and ‖s_k‖² as stored; updates its buffers like the CPU op
        (the distance is NaN without θ_0). prev_dtype: of a new previous-step buffer (p's default).
        """
        theta, start = _flat(p.detach()), _flat(state[EPOCH_START_KEY])
        initial = _flat(state[INITIAL_PARAM_KEY]) if INITIAL_PARAM_KEY in state else None
        prev = state.get(PREV_EPOCH_STEP_KEY)
        prev_flat = _flat(prev) if prev is not None else None
        if prev is None:
            prev = state[PREV_EPOCH_STEP_KEY] = torch.zeros_like(p, dtype=prev_dtype or p.dtype,
                                                                 memory_format=torch.preserve_format)
        step_sumsq, dot_prev, prev_sumsq = zero, zero, zero
        dist_sumsq = zero if initial is not None else torch.full_like(zero, float("nan"))
        new_prev = _flat(prev)
        for lo in range(0, theta.numel(), _EPOCH_CHUNK):
            hi = min(lo + _EPOCH_CHUNK, theta.numel())
            t64 = theta[lo:hi].double()
            s = t64 - start[lo:hi].double()
            step_sumsq = step_sumsq + s.dot(s)
            if prev_flat is not None:
                q = prev_flat[lo:hi].double()
                dot_prev = dot_prev + s.dot(q)
                prev_sumsq = prev_sumsq + q.dot(q)
            if initial is not None:
                d = t64 - initial[lo:hi].double()
                dist_sumsq = dist_sumsq + d.dot(d)
            new_prev[lo:hi] = s  # s_k becomes the next epoch's s_{k-1} (rounded to its dtype)
        start.copy_(theta)
        return torch.stack([step_sumsq, dot_prev, prev_sumsq, dist_sumsq]), _sumsq_f64(new_prev)

    @torch.no_grad()
    def end_epoch(self) -> EpochGeometry | None:
        """Closes an epoch: measures its step s_k = θ − θ_end(k−1) per parameter, in float64.

        Returns ‖s_k‖², ⟨s_k, s_{k−1}⟩, ‖s_{k−1}‖² and ‖θ − θ_0‖² per parameter (see
        `EpochGeometry`), then keeps s_k for the next epoch's per-step `update_dot_prev_epoch`
        and θ as the next epoch's start. One pass over the parameters (on CPU one parallel op
        call for all of them); nothing per step. Without a step since the last epoch end it does
        nothing, warns and returns None.
        """
        if not self.epoch_geometry:
            raise RuntimeError("instrumented_adam: this optimizer was built with epoch_geometry=False")
        if self.steps_done == self._ia.steps_at_epoch_end:
            # An epoch without a step (an evaluation before training starts, as nanoGPT does at
            # iteration 0, or end_epoch() called twice) has no step to measure; closing it would
            # record a zero step, lose the next epoch's angle and overwrite s_{k-1}.
            warnings.warn("instrumented_adam: end_epoch() without a step since the last epoch end (or the start) "
                          "does nothing and returns None", stacklevel=2)
            return None
        layout = self._get_layout()
        device = layout.device
        zero_row = torch.zeros(len(EPOCH_COLUMNS), dtype=torch.float64, device=device)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        all_params = [p for group in self.param_groups for p in group["params"]]
        rows: list[Tensor] = [zero_row] * len(all_params)
        next_prev_sumsq: list[Tensor] = [zero] * len(all_params)
        # One op call per (has a previous step, has θ_0) combination.
        native: dict[tuple[bool, bool], list[tuple[int, Tensor, dict]]] = {}
        for row, p in enumerate(all_params):
            state = self.state.get(p)
            if not state or EPOCH_START_KEY not in state:
                continue
            self._conform_epoch_buffers(p, state)
            has_prev = PREV_EPOCH_STEP_KEY in state
            if _is_sharded(p):
                # FSDP: the buffers stay DTensors (as the rest of the state); the pass runs on the
                # local shards (a zero s_{k-1} measures as none: its dot and norm add exact zeros).
                if not has_prev:
                    state[PREV_EPOCH_STEP_KEY] = self._new_prev_step(p)
                pad = _padding(p)
                p, state = _local(p, pad), {k: _local(v, pad) if k != "step" else v for k, v in state.items()}
            if _native_epoch(p, state):
                if PREV_EPOCH_STEP_KEY not in state:
                    state[PREV_EPOCH_STEP_KEY] = self._new_prev_step(p)
                native.setdefault((has_prev, INITIAL_PARAM_KEY in state), []).append((row, p, state))
            else:
                rows[row], next_prev_sumsq[row] = self._epoch_row_torch(p, state, zero, self._epoch_dtype(p))
        for (has_prev, has_initial), entries in native.items():
            out = torch.empty(len(entries), len(EPOCH_COLUMNS) + 1, dtype=torch.float64)
            epoch_geometry(
                [_real(p.detach()) for _, p, _ in entries],
                [_real(st[EPOCH_START_KEY]) for _, _, st in entries],
                [_real(st[PREV_EPOCH_STEP_KEY]) for _, _, st in entries],
                [_real(st[INITIAL_PARAM_KEY]) for _, _, st in entries] if has_initial else [],
                has_prev,
                out,
            )
            for j, (row, _, _) in enumerate(entries):
                rows[row], next_prev_sumsq[row] = out[j, : len(EPOCH_COLUMNS)], out[j, len(EPOCH_COLUMNS)]
        values = torch.stack(rows) if rows else torch.zeros(0, len(EPOCH_COLUMNS), dtype=torch.float64, device=device)
        geometry = EpochGeometry(
            values=values,
            numel=layout.numel,
            groups=layout.groups,
            num_groups=len(layout.num_params),
            names=None,
            epoch=self.epochs_done,
            has_previous=self.epochs_done > 0,
        )
        self._ia.prev_step_sumsq = torch.stack(next_prev_sumsq) if next_prev_sumsq else None
        self.epochs_done += 1
        self._ia.steps_at_epoch_end = self.steps_done
        self._ia.plans = {}  # the previous epoch's steps now take part in the step
        return geometry

    # ---- moving along the epoch step (EpochExtrapolation) ----------------------------------
    def _epoch_step_entries(self, what: str) -> list[tuple[Tensor, dict]]:
        """(param, state) of every parameter with epoch buffers, checked to be at an epoch end."""
        if not self.epoch_geometry:
            raise RuntimeError(f"instrumented_adam: {what} needs an optimizer built with epoch_geometry=True")
        if self.epochs_done == 0 or self.steps_done != self._ia.steps_at_epoch_end:
            # Between steps θ is no longer θ_end(k): θ_end + α·s_k would throw those steps away.
            raise RuntimeError(f"instrumented_adam: {what} works right after end_epoch(), before the next step "
                               f"(epochs done {self.epochs_done}, steps since the last epoch end "
                               f"{self.steps_done - self._ia.steps_at_epoch_end})")
        entries = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and EPOCH_START_KEY in state and PREV_EPOCH_STEP_KEY in state:
                    entries.append((p, state))
        return entries

    @torch.no_grad()
    def probe_epoch_step(self, alpha: float) -> None:
        """Puts the parameters at θ_end(k) + α·s_k to evaluate a loss there; nothing else changes.

        For learning-rate rules that look further along the last epoch's step (see
        `core.lr_rules.EpochExtrapolation`): call right after `end_epoch()`, evaluate, and finish
        with `probe_epoch_step(0.0)` (θ back to θ_end(k) exactly) or `extrapolate_epoch_step`.
        One pass over the parameters; the optimizer state and the epoch buffers are untouched.
        """
        for p, state in self._epoch_step_entries("probe_epoch_step"):
            p.copy_(state[EPOCH_START_KEY])
            if alpha != 0.0:
                p.add_(state[PREV_EPOCH_STEP_KEY], alpha=float(alpha))

    @torch.no_grad()
    def extrapolate_epoch_step(self, alpha: float) -> None:
        """Moves the parameters to θ_end(k) + α·s_k for good, keeping the epoch buffers consistent.

        Afterwards the epoch just closed is taken to have ended at the new point: θ_end(k) ← θ
        and s_k ← (1 + α)·s_k (the whole displacement from θ_end(k−1), rounded once to the
        parameter's dtype), so the next epoch's step, its angle with s_k and ‖θ − θ₀‖ are measured
        from where the parameters really are. The moments and step counters stay as they are.
        """
        alpha = float(alpha)
        for p, state in self._epoch_step_entries("extrapolate_epoch_step"):
            start, prev = state[EPOCH_START_KEY], state[PREV_EPOCH_STEP_KEY]
            p.copy_(start).add_(prev, alpha=alpha)
            prev.mul_(1.0 + alpha)
            start.copy_(p)
        self._ia.prev_step_sumsq = None  # ‖s_{k-1}‖² changed: recomputed from the buffers when needed

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict plus an `instrumentation` entry (counters); torch.optim ignores it."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            # Our step follows torch's fused arithmetic (Adam, AdamW): say so, so that torch.optim
            # loading this checkpoint continues on its fused path, not silently on another one.
            if "fused" in group and not group.get("differentiable"):
                group["fused"] = True
        state_dict[INSTRUMENTATION_KEY] = {"steps_done": self.steps_done, "epochs_done": self.epochs_done,
                                           "steps_at_epoch_end": self._ia.steps_at_epoch_end}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state_dict of this class or of its torch.optim namesake (validated first)."""
        self._check_state_dict(state_dict)
        counters = state_dict.get(INSTRUMENTATION_KEY, {})
        super().load_state_dict(state_dict)
        if self.epoch_geometry:
            # torch's load casts every state tensor to its parameter's dtype: back to this mode's.
            for group in self.param_groups:
                for p in group["params"]:
                    if p in self.state and self.state[p]:
                        self._conform_epoch_buffers(p, self.state[p])
        self._invalidate()  # ‖s_{k-1}‖² is recomputed from the loaded buffers when needed
        self.steps_done = int(counters.get("steps_done", 0))
        self.epochs_done = int(counters.get("epochs_done", 0))
        # An older checkpoint does not say where the last epoch ended: then any end_epoch() counts.
        self._ia.steps_at_epoch_end = int(counters.get("steps_at_epoch_end", 0 if self.epochs_done == 0 else -1))

    def _prev_sumsq_from_state(self) -> Tensor:
        """‖s_{k-1}‖² per row from the stored buffers (what end_epoch computed, bit for bit)."""
        layout = self._get_layout()
        all_params = [p for group in self.param_groups for p in group["params"]]
        values = [torch.zeros((), dtype=torch.float64, device=layout.device)] * len(all_params)
        native_rows, native_prevs = [], []
        for row, p in enumerate(all_params):
            state = self.state.get(p, {})
            prev = state.get(PREV_EPOCH_STEP_KEY)
            if prev is None:
                continue
            if _is_sharded(p):  # FSDP: this rank's shard, as end_epoch measured it
                pad = _padding(p)
                p, prev = _local(p, pad), _local(prev, pad)
                state = {k: _local(v, pad) if k != "step" else v for k, v in state.items()}
            if _native_epoch(p, state):
                native_rows.append(row)
                native_prevs.append(_real(prev))
            else:
                values[row] = _sumsq_f64(prev)
        if native_rows:
            out = torch.empty(len(native_rows), 1, dtype=torch.float64)
            sum_of_squares(native_prevs, out)
            for j, row in enumerate(native_rows):
                values[row] = out[j, 0]
        return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64, device=layout.device)

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("instrumented_adam: not an optimizer state_dict (expected 'state' and 'param_groups')")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        name = type(self).__name__
        required = ("step", "exp_avg", self._second_moment_key)
        for saved in saved_groups:
            # A group of another optimizer (SGD: lr, momentum, ...) would load and fail at step().
            missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in saved]
            if missing:
                raise ValueError(
                    f"instrumented_adam: this state_dict was not saved by {name} or torch.optim.{name}: "
                    f"its param group has keys {sorted(k for k in saved if k != 'params')} and lacks {missing}"
                )
        for saved, group in zip(saved_groups, self.param_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
                )
            for saved_id, p in zip(saved["params"], group["params"]):
                entry = state_dict["state"].get(saved_id)
                if not entry:
                    continue
                missing = [k for k in required if k not in entry]
                if missing:
                    raise ValueError(
                        f"instrumented_adam: this state_dict was not saved by {name} or torch.optim.{name}: "
                        f"parameter state has keys {sorted(entry)} and lacks {missing}"
                    )
                for k, v in entry.items():
                    if k != "step" and torch.is_tensor(v) and v.shape != p.shape:
                        raise ValueError(
                            f"instrumented_adam: state '{k}' has shape {tuple(v.shape)} but its parameter has shape "
                            f"{tuple(p.shape)}: the state_dict belongs to another model"
                        )


class Adam(_Instrumented, torch.optim.Adam):
    """torch.optim.Adam with a fused, instrumented step.

    Same arguments, defaults and state_dict as `torch.optim.Adam` (its checkpoints load, and
    ours load into it), plus keyword-only `statistics`, `epoch_geometry`, `epoch_buffers` and
    `distance_from_init` (see the module docstring). The update runs
    through the fused kernel (`foreach`/`fused` are accepted for compatibility): fp32 parameters
    follow `torch.optim.Adam(fused=True)` bitwise. With `differentiable=True` it runs torch's
    differentiable single-tensor math instead (bitwise `torch.optim.Adam(differentiable=True)`,
    gradients through the step included), still measured (see `core.functional` for the cost).
    """


class AdamW(_Instrumented, torch.optim.AdamW):
    """torch.optim.AdamW with a fused, instrumented step (see `Adam`)."""


class Adamax(_Instrumented, torch.optim.Adamax):
    """torch.optim.Adamax with a fused, instrumented step (see `Adam`).

    The second moment is torch's `exp_inf` (u_t); `second_moment_sum` sums it and the effective
    step size is lr / (bc1 · u). torch.optim.Adamax has no fused path: ours follows its
    single-tensor path operation for operation.
    """

    _second_moment_key = "exp_inf"
    _sparse_message = "Adamax does not support sparse gradients"

    def _algorithm(self, group: dict) -> functional.Algorithm:
        return functional.Algorithm.ADAMAX

    def _functional_step(self, group: dict, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                         second_moments: list[Tensor], max_second_moments: list[Tensor],
                         state_steps: list[Tensor], **kwargs: Any) -> None:
        beta1, beta2 = group["betas"]
        functional.adamax(params, grads, exp_avgs, second_moments, state_steps, lr=group["lr"], beta1=beta1,
                          beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                          maximize=bool(group.get("maximize", False)), **kwargs)
