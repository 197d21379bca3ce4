"""The classic optimizers' compiled ops (SGD, RMSprop, Adagrad; schemas in csrc/ops.cpp) and their
fake kernels for torch.compile, written as `_ops.py` writes Adam's: the fake kernels check shapes,
dtypes and list lengths with `torch._check` and allocate nothing (every op mutates its arguments).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._ops import _KERNEL_DTYPES, _check_companions, _check_stats

#: SGD (momentum, dampening, Nesterov), RMSprop (centered, momentum), Adagrad (lr_decay).
sgd_step = torch.ops.instrumented_adam.sgd_step
rmsprop_step = torch.ops.instrumented_adam.rmsprop_step
adagrad_step = torch.ops.instrumented_adam.adagrad_step


def _check_common(op: str, params: Sequence[Tensor], grads: Sequence[Tensor], prev_epoch_steps: Sequence[Tensor],
                  stats: Tensor | None, stat_rows: Sequence[int]) -> None:
    n = len(params)
    torch._check(len(grads) == n, lambda: f"instrumented_adam: {op}: params and grads must have the same length")
    torch._check(len(prev_epoch_steps) in (0, n),
                 lambda: "instrumented_adam: prev_epoch_steps must be empty or have one tensor per parameter")
    torch._check(len(stat_rows) in (0, n),
                 lambda: "instrumented_adam: stat_rows must be empty or have one row per parameter")
    for p in params:
        torch._check(p.dtype in _KERNEL_DTYPES, lambda: "instrumented_adam: parameters must be float32, float64, "
                                                        f"bfloat16 or float16, got {p.dtype}")
    _check_companions(params, grads, "grads")
    # The previous epoch's step may be bfloat16 (compact epoch buffers; the CPU kernels read it).
    _check_companions(params, prev_epoch_steps, "prev_epoch_steps", allow_bfloat16=True)
    _check_stats(stats, stat_rows, n)


def _check_state(op: str, params: Sequence[Tensor], tensors: Sequence[Tensor], name: str, used: bool) -> None:
    if used:
        torch._check(len(tensors) == len(params),
                     lambda: f"instrumented_adam: {op}: {name} must have one tensor per parameter")
        _check_companions(params, tensors, name)


def _check_steps(op: str, params: Sequence[Tensor], state_steps: Sequence[Tensor]) -> None:
    torch._check(len(state_steps) == len(params),
                 lambda: f"instrumented_adam: {op}: state_steps must have one tensor per parameter")
    for i, s in enumerate(state_steps):
        torch._check(s.numel() == 1, lambda: f"instrumented_adam: state_steps[{i}] must be a one-element tensor")


@torch.library.register_fake("instrumented_adam::sgd_step")
def _sgd_step_fake(params, grads, momentum_buffers, prev_epoch_steps, *, lr, lr_tensor, momentum, dampening,
                   weight_decay, nesterov, maximize, first_step, grad_scale, found_inf, stats, stat_rows) -> None:
    _check_common("sgd_step", params, grads, prev_epoch_steps, stats, stat_rows)
    _check_state("sgd_step", params, momentum_buffers, "momentum_buffers", momentum != 0)
    torch._check(len(first_step) in (0, len(params)),
                 lambda: "instrumented_adam: sgd_step: first_step must be empty or have one entry per parameter")
    return None


@torch.library.register_fake("instrumented_adam::rmsprop_step")
def _rmsprop_step_fake(params, grads, square_avgs, momentum_buffers, grad_avgs, prev_epoch_steps, state_steps, *,
                       lr, lr_tensor, alpha, eps, weight_decay, momentum, centered, maximize, grad_scale, found_inf,
                       stats, stat_rows) -> None:
    _check_common("rmsprop_step", params, grads, prev_epoch_steps, stats, stat_rows)
    _check_state("rmsprop_step", params, square_avgs, "square_avgs", True)
    _check_state("rmsprop_step", params, momentum_buffers, "momentum_buffers", momentum > 0)
    _check_state("rmsprop_step", params, grad_avgs, "grad_avgs", centered)
    _check_steps("rmsprop_step", params, state_steps)
    return None


@torch.library.register_fake("instrumented_adam::adagrad_step")
def _adagrad_step_fake(params, grads, state_sums, prev_epoch_steps, state_steps, *, lr, lr_tensor, lr_decay,
                       weight_decay, eps, maximize, grad_scale, found_inf, stats, stat_rows) -> None:
    _check_common("adagrad_step", params, grads, prev_epoch_steps, stats, stat_rows)
    _check_state("adagrad_step", params, state_sums, "state_sums", True)
    _check_steps("adagrad_step", params, state_steps)
    return None


__all__ = ["sgd_step", "rmsprop_step", "adagrad_step"]
