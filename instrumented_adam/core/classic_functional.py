"""The functional step of SGD, RMSprop and Adagrad: one instrumented call over plain tensor lists.

As `core.functional` does for Adam: the tensors of a step and the hyperparameters in, everything
updated in place, nothing returned; the classes of `core.classic` call these once per parameter
group. The tensors must be what the compiled op checks (one device, float32/float64/bfloat16/
float16, each parameter's gradient and state in its dtype, shape and dense layout; complex tensors
only with `has_complex=True`, updated as `view_as_real` pairs).

Common keyword arguments, as for `core.functional.adam`:
    lr: a float or a one-element tensor.
    prev_epoch_steps: the previous epoch's step per parameter (for `update_dot_prev_epoch`), or empty.
    stats, stat_rows: a contiguous [rows, NUM_STATS] float64 tensor, zeroed and filled (row
        `stat_rows[i]`, or i, per parameter), or None for the plain update.
    grad_scale, found_inf: GradScaler's tensors (gradients unscaled in place; found_inf skips the
        whole step: state, counters and statistics untouched).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._classic_ops import adagrad_step, rmsprop_step, sgd_step


def _as_real(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


def _lists(*seqs: Sequence[Tensor], has_complex: bool) -> list[list[Tensor]]:
    if has_complex:
        return [_as_real(s) for s in seqs]
    return [s if isinstance(s, list) else list(s) for s in seqs]


def _lr(lr: float | Tensor) -> tuple[float, Tensor | None]:
    return (0.0, lr) if isinstance(lr, Tensor) else (float(lr), None)


def sgd(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float | Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: Sequence[int] = (),
    prev_epoch_steps: Sequence[Tensor] = (),
    stats: Tensor | None = None,
    stat_rows: Sequence[int] = (),
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_complex: bool = False,
) -> None:
    """One SGD step (torch.optim.SGD(fused=True)'s arithmetic), measured.

    `momentum_buffers`: one per parameter when momentum != 0, else empty; `first_step[i]` = 1
    marks a buffer created for this step (it becomes the gradient, as torch's first step does).
    """
    with torch.no_grad():
        params, grads, momentum_buffers, prev_epoch_steps = _lists(params, grads, momentum_buffers, prev_epoch_steps,
                                                                   has_complex=has_complex)
        lr_value, lr_tensor = _lr(lr)
        sgd_step(params, grads, momentum_buffers, prev_epoch_steps, lr=lr_value, lr_tensor=lr_tensor,
                 momentum=float(momentum), dampening=float(dampening), weight_decay=float(weight_decay),
                 nesterov=bool(nesterov), maximize=bool(maximize), first_step=[int(f) for f in first_step],
                 grad_scale=grad_scale, found_inf=found_inf, stats=stats, stat_rows=list(stat_rows))


def rmsprop(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    square_avgs: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    grad_avgs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
    prev_epoch_steps: Sequence[Tensor] = (),
    stats: Tensor | None = None,
    stat_rows: Sequence[int] = (),
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_complex: bool = False,
) -> None:
    """One RMSprop step (torch.optim.RMSprop's single-tensor arithmetic), measured.

    `momentum_buffers` one per parameter when momentum > 0, `grad_avgs` when centered, else empty.
    """
    with torch.no_grad():
        params, grads, square_avgs, momentum_buffers, grad_avgs, prev_epoch_steps = _lists(
            params, grads, square_avgs, momentum_buffers, grad_avgs, prev_epoch_steps, has_complex=has_complex)
        lr_value, lr_tensor = _lr(lr)
        rmsprop_step(params, grads, square_avgs, momentum_buffers, grad_avgs, prev_epoch_steps, list(state_steps),
                     lr=lr_value, lr_tensor=lr_tensor, alpha=float(alpha), eps=float(eps),
                     weight_decay=float(weight_decay), momentum=float(momentum), centered=bool(centered),
                     maximize=bool(maximize), grad_scale=grad_scale, found_inf=found_inf, stats=stats,
                     stat_rows=list(stat_rows))


def adagrad(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state_sums: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
    prev_epoch_steps: Sequence[Tensor] = (),
    stats: Tensor | None = None,
    stat_rows: Sequence[int] = (),
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_complex: bool = False,
) -> None:
    """One Adagrad step (torch.optim.Adagrad(fused=True)'s arithmetic), measured."""
    with torch.no_grad():
        params, grads, state_sums, prev_epoch_steps = _lists(params, grads, state_sums, prev_epoch_steps,
                                                             has_complex=has_complex)
        lr_value, lr_tensor = _lr(lr)
        adagrad_step(params, grads, state_sums, prev_epoch_steps, list(state_steps), lr=lr_value, lr_tensor=lr_tensor,
                     lr_decay=float(lr_decay), weight_decay=float(weight_decay), eps=float(eps),
                     maximize=bool(maximize), grad_scale=grad_scale, found_inf=found_inf, stats=stats,
                     stat_rows=list(stat_rows))


__all__ = ["sgd", "rmsprop", "adagrad"]
