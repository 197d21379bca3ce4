"""SGD, RMSprop and Adagrad with a fused, instrumented step.

Each class subclasses its torch.optim namesake (constructor, defaults, validation messages,
param groups and state_dict layout are torch's own) and the instrumented machinery of
`core.optimizer` (statistics buffer, epoch geometry, checkpoints, GradScaler, torch.compile):
only the kernel call and the state each keeps differ. One kernel call per parameter group updates
every tensor and measures the statistics of `STAT_NAMES` in the same pass (the table's families
say which columns each defines; the others are 0).

Numerics (CPU): fp32 parameters and state follow `torch.optim.SGD(fused=True)` and
`torch.optim.Adagrad(fused=True)` bitwise, and `torch.optim.RMSprop`'s single-tensor path (it has
no fused kernel) bitwise, including torch's CPU sqrt (MKL's, not IEEE's). bf16/fp16 compute in
fp32 registers as torch's fused kernels do (see csrc/classic_rules.h for torch 2.13's fused SGD,
whose reduced-type vector loop does not update the parameters).

Numerics (CUDA; csrc/cuda/classic_rules.cuh, docs/cuda.md): SGD and Adagrad follow torch's fused
CUDA kernels (Adagrad's, and older torch's SGD, compute in double where their hyperparameters
meet fp32 values), RMSprop torch's single-tensor sequence of ATen ops as its CUDA kernels round
them; lr tensors, the step counters, grad_scale and found_inf are read on the device (no host
synchronisation).

Not supported (a clear error instead): sparse gradients (torch's non-fused SGD and Adagrad accept
them; use those for sparse embeddings), `differentiable=True` (use torch.optim's class), and
devices other than CPU and CUDA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import classic_functional as F
from .optimizer import (
    EPOCH_START_KEY,
    INITIAL_PARAM_KEY,
    PREV_EPOCH_STEP_KEY,
    _GroupPlan,
    _Instrumented,
    _is_dense,
    _real,
)


class _Classic(_Instrumented):
    """The instrumented step for a torch.optim class with per-parameter state tensors.

    Subclasses name their state keys in the rule's slot order (`_slots`, at most three) and say
    which slots a group uses; the plan's three state lists of `_GroupPlan` (named after Adam's
    exp_avgs, second_moments, max_second_moments) carry the slots in that order.
    """

    #: state keys in the kernel rule's order (csrc/classic_rules.h)
    _slots: tuple[str, ...] = ()
    #: whether the optimizer keeps a `step` counter per parameter
    _has_step = True
    #: param group keys a state_dict of this optimizer must have
    _group_keys: tuple[str, ...] = ("lr",)

    def __init__(self, *args: Any, statistics: bool = True, epoch_geometry: bool = True, histogram_every: int = 0,
                 epoch_buffers: str = "exact", **kwargs: Any) -> None:
        if histogram_every:
            # The kernel histograms are counted by the Adam family's ops only (core.histogram).
            raise ValueError(f"instrumented_adam.{type(self).__name__} does not take histograms yet "
                             f"(histogram_every={histogram_every!r}); Adam, AdamW and Adamax do")
        super().__init__(*args, statistics=statistics, epoch_geometry=epoch_geometry, epoch_buffers=epoch_buffers,
                         **kwargs)
        if any(group.get("differentiable") for group in self.param_groups):
            raise ValueError(f"instrumented_adam.{type(self).__name__} does not support differentiable=True; "
                             f"use torch.optim.{type(self).__name__} for a differentiable step")

    def _slots_used(self, group: dict) -> tuple[bool, ...]:
        """Which of `_slots` the group's options need."""
        return tuple(True for _ in self._slots)

    def _plan_options(self, group: dict) -> tuple:
        return self._slots_used(group)

    def _new_slot(self, p: Tensor, group: dict, key: str) -> Tensor:
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if p.grad is not None and p.grad.is_sparse:
            raise RuntimeError(self._sparse_message)
        if self._has_step:
            step = state.get("step")
            if step is None:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            elif not torch.is_tensor(step):
                state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
            elif step.device != p.device:
                state["step"] = step.to(device=p.device, dtype=torch.float32)
        for key, used in zip(self._slots, self._slots_used(group)):
            if used and state.get(key) is None:
                state[key] = self._new_slot(p, group, key)
        self._match_layout(p, state)
        if self.epoch_geometry:
            if EPOCH_START_KEY not in state:
                state[EPOCH_START_KEY] = p.detach().clone(memory_format=torch.preserve_format)
                state[INITIAL_PARAM_KEY] = p.detach().clone(memory_format=torch.preserve_format)
            if self._ia.has_prev_epoch and PREV_EPOCH_STEP_KEY not in state:
                state[PREV_EPOCH_STEP_KEY] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _make_plan(self, group: dict, key: tuple, indices: list[int], num_params: int) -> _GroupPlan:
        used = self._slots_used(group)
        slots: list[list[Tensor]] = [[], [], []]
        params, prevs, steps, relayout, first = [], [], [], [], []
        track_prev = self.statistics and self.epoch_geometry and self._ia.has_prev_epoch
        for pos, i in enumerate(indices):
            p = group["params"][i]
            fresh = [k for k, u in zip(self._slots, used) if u and self.state[p].get(k) is None]
            state = self._init_state(p, group)
            first.append(1 if fresh else 0)
            if not p.is_complex() and p.numel() > 0 and not _is_dense(p):
                relayout.append(pos)
            params.append(_real(p))
            for s, (k, u) in enumerate(zip(self._slots, used)):
                if u:
                    slots[s].append(_real(state[k]))
            if track_prev:
                prevs.append(_real(state[PREV_EPOCH_STEP_KEY]))
            if self._has_step:
                steps.append(state["step"])
        rows = [] if len(indices) == num_params else list(indices)
        has_complex = any(group["params"][i].is_complex() for i in indices)
        plan = _GroupPlan(key, indices, params, slots[0], slots[1], slots[2], prevs, steps, rows, relayout,
                          [t.stride() for t in params], has_complex)
        plan.options = self._plan_options(group)  # type: ignore[attr-defined]
        plan.first_step = first if any(first) else []  # type: ignore[attr-defined]
        return plan

    def _step_group(self, gi: int, group: dict, layout, grad_scale, found_inf, take_histograms: bool = False) -> bool:
        if layout.device.type not in ("cpu", "cuda"):
            raise NotImplementedError(f"instrumented_adam.{type(self).__name__} runs on CPU and CUDA; "
                                      f"use torch.optim.{type(self).__name__} on {layout.device}")
        plan = self._ia.plans.get(gi)
        if plan is not None and getattr(plan, "options", None) != self._plan_options(group):
            del self._ia.plans[gi]  # an option that changes the state (momentum, centered) changed
        self._ia.classic_group = gi
        replanned = super()._step_group(gi, group, layout, grad_scale, found_inf)
        plan = self._ia.plans.get(gi)
        if plan is not None and plan.first_step:
            # The new buffers now hold their first value, unless the step was skipped (AMP).
            if found_inf is None or not self._first_step_skipped(group, found_inf):
                plan.first_step = []
        return replanned

    def _first_step_skipped(self, group: dict, found_inf: Tensor) -> bool:
        """Whether the step that was to fill new momentum buffers was skipped (GradScaler).

        On CPU, found_inf is read (free). On CUDA that would synchronise with the device, and it is
        only needed when it matters: a skipped first step leaves the new (zero) buffer b = 0, and
        the next step then computes μ·0 + (1 − τ)·g, which is g, the first-step value, exactly when
        the dampening τ is 0 (SGD's default). So on CUDA found_inf is read only with dampening != 0
        (one synchronisation, on the first step of new buffers only).
        """
        if found_inf.device.type == "cpu" or group.get("dampening", 0) != 0:
            return bool(found_inf.item())
        return False

    def _first_step(self) -> list[int]:
        plan = self._ia.plans.get(getattr(self._ia, "classic_group", -1))
        return list(plan.first_step) if plan is not None else []

    def _step_group_differentiable(self, *args: Any, **kwargs: Any) -> bool:
        raise RuntimeError(f"instrumented_adam.{type(self).__name__} does not support differentiable=True")

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("instrumented_adam: not an optimizer state_dict (expected 'state' and 'param_groups')")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        name = type(self).__name__
        for saved in saved_groups:
            missing = [k for k in self._group_keys if k not in saved]
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
                required = [k for k, used in zip(self._slots, self._slots_used(saved)) if used and self._required(k)]
                if self._has_step:
                    required.append("step")
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

    def _required(self, key: str) -> bool:
        """Whether a state_dict must hold `key` for every parameter with state."""
        return True


class SGD(_Classic, torch.optim.SGD):
    """torch.optim.SGD with a fused, instrumented step.

    Same arguments, defaults and state_dict as `torch.optim.SGD` (its `momentum_buffer` state;
    no step counter), plus keyword-only `statistics` and `epoch_geometry`. fp32 parameters and
    momentum buffers follow `torch.optim.SGD(fused=True)` bitwise. The statistics' first moment is
    the momentum buffer (0 without momentum), there is no second moment, and the effective step
    size is lr. Sparse gradients are refused (torch.optim.SGD's non-fused path takes them).
    """

    _slots = ("momentum_buffer",)
    _has_step = False
    _group_keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    _sparse_message = ("instrumented_adam.SGD does not support sparse gradients; use torch.optim.SGD "
                       "(fused=False) for sparse parameters")

    def _slots_used(self, group: dict) -> tuple[bool, ...]:
        return (group["momentum"] != 0,)

    def _required(self, key: str) -> bool:
        return False  # torch creates the buffer at the first step; a None buffer starts afresh

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if "momentum_buffer" in state and state["momentum_buffer"] is None:
            del state["momentum_buffer"]  # torch's non-fused SGD stores None before the first step
        return super()._init_state(p, group)

    def _functional_step(self, group: dict, params: list[Tensor], grads: list[Tensor], slot0: list[Tensor],
                         slot1: list[Tensor], slot2: list[Tensor], state_steps: list[Tensor], **kwargs: Any) -> None:
        F.sgd(params, grads, slot0, lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
              weight_decay=group["weight_decay"], nesterov=bool(group["nesterov"]),
              maximize=bool(group.get("maximize", False)), first_step=self._first_step(), **kwargs)


class RMSprop(_Classic, torch.optim.RMSprop):
    """torch.optim.RMSprop with a fused, instrumented step.

    Same arguments, defaults and state_dict as `torch.optim.RMSprop` (`step`, `square_avg`,
    `momentum_buffer` with momentum, `grad_avg` when centered), plus keyword-only `statistics` and
    `epoch_geometry`. fp32 follows torch's single-tensor path bitwise (torch has no fused
    RMSprop). Statistics: first moment the momentum buffer (0 without momentum), second moment
    v (v − ḡ² when centered: the moment under the root), effective step size lr / (√· + ε).
    """

    _slots = ("square_avg", "momentum_buffer", "grad_avg")
    _group_keys = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")
    _sparse_message = "RMSprop does not support sparse gradients"

    def _slots_used(self, group: dict) -> tuple[bool, ...]:
        return (True, group["momentum"] > 0, bool(group["centered"]))

    def _functional_step(self, group: dict, params: list[Tensor], grads: list[Tensor], slot0: list[Tensor],
                         slot1: list[Tensor], slot2: list[Tensor], state_steps: list[Tensor], **kwargs: Any) -> None:
        F.rmsprop(params, grads, slot0, slot1, slot2, state_steps, lr=group["lr"], alpha=group["alpha"],
                  eps=group["eps"], weight_decay=group["weight_decay"], momentum=group["momentum"],
                  centered=bool(group["centered"]), maximize=bool(group.get("maximize", False)), **kwargs)


class Adagrad(_Classic, torch.optim.Adagrad):
    """torch.optim.Adagrad with a fused, instrumented step.

    Same arguments, defaults and state_dict as `torch.optim.Adagrad` (`step`, `sum`, created at
    construction as torch does), plus keyword-only `statistics` and `epoch_geometry`. fp32 follows
    `torch.optim.Adagrad(fused=True)` bitwise. Statistics: no first moment, second moment the
    accumulated sum s, effective step size clr / (√s + ε) with clr = lr / (1 + (t − 1)·lr_decay).
    Sparse gradients are refused (torch.optim.Adagrad's non-fused path takes them).
    """

    _slots = ("sum",)
    _group_keys = ("lr", "lr_decay", "weight_decay", "eps", "initial_accumulator_value")
    _sparse_message = ("instrumented_adam.Adagrad does not support sparse gradients; use torch.optim.Adagrad "
                       "(fused=False) for sparse parameters")

    def _new_slot(self, p: Tensor, group: dict, key: str) -> Tensor:
        init = group["initial_accumulator_value"]
        return torch.full_like(p, init, memory_format=torch.preserve_format)

    def _functional_step(self, group: dict, params: list[Tensor], grads: list[Tensor], slot0: list[Tensor],
                         slot1: list[Tensor], slot2: list[Tensor], state_steps: list[Tensor], **kwargs: Any) -> None:
        F.adagrad(params, grads, slot0, state_steps, lr=group["lr"], lr_decay=group["lr_decay"],
                  weight_decay=group["weight_decay"], eps=group["eps"], maximize=bool(group.get("maximize", False)),
                  **kwargs)


__all__ = ["SGD", "RMSprop", "Adagrad"]
