"""Per-step capture: the optimizer's statistics buffer copied into a device ring, nothing read back.

The optimizer's kernel leaves the step's per-tensor sums in a small device buffer ([tensors,
NUM_STATS] float64). `StepCapture.capture` (called from the recorder's step post-hook) copies that
buffer into the next slot of a preallocated device ring (one device-to-device copy, no Python loop
over tensors, no host synchronisation) and notes the step number, the epoch, the hyperparameters
in force and, under AMP, GradScaler's skip flag and scale. When the ring is full, or when what the
buffered rows mean changes (a parameter gains or loses its gradient, an epoch ends, a group is
added, a hyperparameter appears), the buffered steps are handed on as one `CapturedBlock` to the
writer, which derives and writes them in a batch.

Hyperparameters are not Adam's alone: `flatten_hyperparameters` turns any torch.optim param group
into flat numeric columns (``betas`` -> beta1, beta2; SGD's momentum, dampening, nesterov;
RMSprop's alpha, centered; ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

# Device ring memory cap: beyond it the ring holds fewer steps and flushes more often.
RING_BYTES = 64 << 20

#: Param-group entries that choose an implementation, not the mathematics of the update: not
#: recorded as hyperparameters (torch.optim's foreach/fused/capturable/differentiable switches).
IMPLEMENTATION_SWITCHES = frozenset({"params", "foreach", "fused", "capturable", "differentiable"})
#: Entries an LR scheduler adds to a group for its own bookkeeping (the lr it started from), not
#: a setting in force: not recorded per row (the run's optimizer_config keeps it).
SCHEDULER_KEYS = frozenset({"initial_lr"})


def _is_number(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, (bool, int, float)) and not isinstance(value, complex)


def flatten_hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    """A param group's numeric hyperparameters under flat column names, in the group's order.

    Floats, ints, bools and one-element tensors are kept (tensors as they are: the caller decides
    when to read them); a pair such as ``betas`` becomes ``beta1, beta2`` (any other tuple of
    numbers ``name_1, name_2, ...``); ``params``, lists, None, strings, torch.optim's
    implementation switches (foreach, fused, capturable, differentiable) and an LR scheduler's
    ``initial_lr`` are skipped.

    >>> flatten_hyperparameters({"params": [], "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "foreach": None})
    {'lr': 0.001, 'beta1': 0.9, 'beta2': 0.999, 'eps': 1e-08}
    """
    out: dict[str, Any] = {}
    for key, value in group.items():
        if key in IMPLEMENTATION_SWITCHES or key in SCHEDULER_KEYS or not isinstance(key, str):
            continue
        if isinstance(value, tuple):
            if not value or not all(_is_number(v) for v in value):
                continue
            stem = key[:-1] if key == "betas" else key  # betas -> beta1, beta2 (torch's names)
            for i, v in enumerate(value, 1):
                out[f"{stem}{i}" if key == "betas" else f"{stem}_{i}"] = v
        elif _is_number(value):
            out[key] = value
    return out


@dataclass(frozen=True)
class HyperparameterLayout:
    """The hyperparameter columns of a run's rows (the union over its param groups, in order),
    and how to read each one from a group: (key, index in a tuple or None) per column."""

    names: tuple[str, ...]
    sources: tuple[tuple[str, int | None], ...]
    signature: tuple[int, ...]  # len() of each group when built: a group that gains keys rebuilds

    @classmethod
    def of(cls, groups: list[dict[str, Any]]) -> "HyperparameterLayout":
        sources: dict[str, tuple[str, int | None]] = {}
        for group in groups:
            for name in flatten_hyperparameters(group):
                if name not in sources:
                    if name in group:
                        sources[name] = (name, None)
                    else:  # beta1 -> ("betas", 0); momentum_2 -> ("momentum", 1)
                        key, _, index = (("betas", "", name[4:]) if name.startswith("beta") and "betas" in group
                                         else name.rpartition("_"))
                        sources[name] = (key, int(index) - 1)
        return cls(tuple(sources), tuple(sources.values()), tuple(len(g) for g in groups))

    def values(self, group: Mapping[str, Any]) -> tuple[Any, ...]:
        """This group's values in column order (NaN where it lacks one); tensors are cloned (a
        device op: their value at this step), so the step does not have to be read now. A tuple
        holding tensors is a `_WithTensors` (so the writer finds them without looking)."""
        out = []
        tensors = False
        for key, index in self.sources:
            value = group.get(key, math.nan)
            if index is not None:
                value = value[index] if isinstance(value, tuple) and index < len(value) else math.nan
            if isinstance(value, Tensor):
                value = value.detach().clone() if value.numel() == 1 else math.nan
                tensors = True
            out.append(value)
        return _WithTensors(out) if tensors else tuple(out)


class _WithTensors(tuple):
    """Hyperparameter values of a group of which some are (cloned) tensors: marks the rare case cheaply."""


@dataclass
class StepMeta:
    """What the host knows of a buffered step: numbers, or device tensors read at write time."""

    step: int
    epoch: int
    hyper: tuple[tuple[Any, ...], ...]  # per group, in HyperparameterLayout order
    found_inf: Any = None  # GradScaler's flag (a tensor) when the step ran under AMP, else None
    grad_scale: Any = None  # the loss scale in force (a tensor), else None
    nonfinite: Any = None  # non-finite gradient elements of a skipped step, when counted (CPU)
    has_tensors: bool = False  # some field above holds a tensor (the rare case, marked cheaply)


@dataclass
class CapturedBlock:
    """Buffered steps handed to the writer: ``ring`` [n, tensors, NUM_STATS] (a view of the device
    ring: derive from it before the next capture overwrites it), their context and host meta."""

    ring: Tensor
    numel: Tensor
    groups: Tensor
    num_groups: int
    prev_step_sumsq: Tensor | None
    meta: list[StepMeta]
    hyper_names: tuple[str, ...]


def _amp_state(optimizer: torch.optim.Optimizer) -> tuple[Any, Any, Any, bool]:
    """GradScaler's found_inf / grad_scale as the optimizer saw them in this step (GradScaler
    sets them as attributes around ``optimizer.step()`` for optimizers that unscale themselves)."""
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is None:
        return None, None, None, False
    grad_scale = getattr(optimizer, "grad_scale", None)
    nonfinite = None
    if isinstance(found_inf, Tensor) and found_inf.device.type == "cpu":
        # On CPU the flag is a host value (the kernel reads it the same way): a skipped step's
        # non-finite gradient elements can be counted here, once, at no cost to normal steps.
        if float(found_inf) != 0:
            nonfinite = float(sum(int((~torch.isfinite(p.grad)).sum()) for g in optimizer.param_groups
                                  for p in g["params"] if p.grad is not None))
        found_inf = float(found_inf)
        grad_scale = float(grad_scale) if isinstance(grad_scale, Tensor) and grad_scale.device.type == "cpu" else grad_scale
    # On CUDA reading them would synchronise: cloned (device ops) and read when the block lands.
    # The element count of a skipped CUDA step is not known (the kernel skips the pass): NaN.
    if isinstance(found_inf, Tensor):
        found_inf = found_inf.detach().clone()
    if isinstance(grad_scale, Tensor):
        grad_scale = grad_scale.detach().clone()
    return found_inf, grad_scale, nonfinite, isinstance(found_inf, Tensor) or isinstance(grad_scale, Tensor)


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether two context tensors are the same: by identity (free; what the eager step hands
    out), else by value — a compiled step's `record_step` op may be given other tensor objects
    holding the same small context (element counts, groups, ‖s_{k-1}‖²)."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    return a.shape == b.shape and a.device == b.device and a.dtype == b.dtype and bool(torch.equal(a, b))


class StepCapture:
    """The device ring of buffered step statistics and their host-side meta.

    Args:
        step_every: capture steps whose number is divisible by this.
        flush_every: hand the buffered steps on after at most this many steps.
        emit: receives each `CapturedBlock`; it must launch its device work on the block's ring
            before returning (the ring slots are reused afterwards, in stream order).
    """

    def __init__(self, step_every: int, flush_every: int, emit: Callable[[CapturedBlock], None]) -> None:
        self.step_every = int(step_every)
        self.flush_every = int(flush_every)
        self._emit = emit
        self.ring: Tensor | None = None
        self._context: tuple | None = None  # numel, groups, num_groups, prev_step_sumsq of the buffered rows
        self._fill = 0
        self._meta: list[StepMeta] = []
        self.layout: HyperparameterLayout | None = None
        self.last_hyper: tuple[tuple[Any, ...], ...] | None = None  # of the last step, recorded or not

    @property
    def buffered(self) -> int:
        """Steps in the ring not yet handed on."""
        return self._fill

    def hyperparameter_layout(self, groups: list[dict[str, Any]]) -> HyperparameterLayout:
        """The current layout, rebuilt (after handing on the rows of the old one) when a group was
        added or gained a key (an LR scheduler's ``initial_lr``)."""
        layout = self.layout
        if layout is None or len(layout.signature) != len(groups) or any(
            len(g) != n for g, n in zip(groups, layout.signature)
        ):
            self.take()
            layout = self.layout = HyperparameterLayout.of(groups)
        return layout

    def capture(self, optimizer: torch.optim.Optimizer, step: int, epoch: int, stats: Any = None) -> None:
        """The per-step work: one device copy and a few host numbers. Runs every step, so it
        is written for speed: identity checks only, a loop over groups (few), none over tensors.

        stats: the step's `StepStatistics` when the caller has them (a compiled step), else the
        optimizer's `last_step_statistics(copy=False)`."""
        groups = optimizer.param_groups
        layout = self.hyperparameter_layout(groups)
        hyper = tuple([layout.values(g) for g in groups])
        self.last_hyper = hyper
        if step % self.step_every:
            return
        if stats is None:
            stats = optimizer.last_step_statistics(copy=False)  # copied into the ring just below
        # The per-row element counts, group index and ‖s_{k-1}‖² change rarely; the optimizer
        # then hands out new tensors, so comparing identities (free) tells when the buffered
        # rows must be derived with the old ones first.
        context = self._context
        if (
            context is None
            or not _same(stats.numel, context[0])
            or not _same(stats.groups, context[1])
            or not _same(stats.prev_step_sumsq, context[3])
        ):
            self._new_context(stats.values, (stats.numel, stats.groups, stats.num_groups, stats.prev_step_sumsq))
        self.ring[self._fill].copy_(stats.values)
        found_inf, grad_scale, nonfinite, amp_tensors = _amp_state(optimizer)
        has_tensors = amp_tensors or any([type(hp) is _WithTensors for hp in hyper])
        self._meta.append(StepMeta(step, epoch, hyper, found_inf, grad_scale, nonfinite, has_tensors))
        self._fill += 1
        if self._fill == self.ring.shape[0]:
            self.take()

    def _new_context(self, values: Tensor, context: tuple) -> None:
        """Hands on rows buffered under the old context; (re)allocates the ring if its shape changed."""
        self.take()
        ring = self.ring
        if ring is None or ring.shape[1:] != values.shape or ring.device != values.device or ring.dtype != values.dtype:
            row_bytes = max(1, values.numel() * values.element_size())
            capacity = max(1, min(-(-self.flush_every // self.step_every), RING_BYTES // row_bytes))
            self.ring = torch.empty((capacity, *values.shape), dtype=values.dtype, device=values.device)
        self._context = context

    def take(self) -> None:
        """Hands the buffered steps (if any) to `emit` and empties the ring."""
        n = self._fill
        if n == 0:
            return
        assert self.ring is not None and self._context is not None and self.layout is not None
        numel, groups, num_groups, prev = self._context
        block = CapturedBlock(self.ring[:n], numel, groups, num_groups, prev, self._meta, self.layout.names)
        self._meta = []
        self._fill = 0
        self._emit(block)


__all__ = ["StepCapture", "CapturedBlock", "StepMeta", "HyperparameterLayout", "flatten_hyperparameters", "RING_BYTES"]
