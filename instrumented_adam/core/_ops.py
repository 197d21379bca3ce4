"""The compiled ops (csrc/ops.cpp holds their schemas) and their fake kernels for torch.compile.

One op per optimizer family: `adam_step` (Adam, AdamW, Adamax; the family of csrc/stats_table.h's
kFamilyAdam and kFamilyAdamax), plus the family-independent epoch ops. The fake kernels check what
the real kernels check about shapes, dtypes and list lengths (with `torch._check`, so that a traced
call fails the same way an eager one does) and allocate nothing: every op mutates its arguments.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Sequence

import torch
from torch import Tensor

from .histogram import HISTOGRAM_BINS, HISTOGRAM_KINDS
from .table import EPOCH_COLUMNS, NUM_STATS, STAT_INDEX, STAT_NAMES  # noqa: F401  (re-exported; loads the library)


class Algorithm(IntEnum):
    """The `algorithm` argument of `adam_step` (csrc/adam_math.h keeps the same values)."""

    ADAM = 0
    ADAMW = 1
    ADAMAX = 2


#: The Adam family's step (Adam, AdamW, Adamax).
adam_step = torch.ops.instrumented_adam.adam_step
epoch_geometry = torch.ops.instrumented_adam.epoch_geometry
sum_of_squares = torch.ops.instrumented_adam.sum_of_squares

#: Columns of epoch_geometry's output: the epoch statistics, then ‖s as stored‖².
EPOCH_GEOMETRY_COLUMNS = len(EPOCH_COLUMNS) + 1

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_stats(stats: Tensor | None, stat_rows: Sequence[int], n: int) -> None:
    """The statistics output of a step op over n parameters (every family's op takes the same)."""
    if stats is not None:
        torch._check(
            stats.dtype == torch.float64 and stats.dim() == 2 and stats.shape[1] == NUM_STATS,
            lambda: f"instrumented_adam: stats must be a contiguous float64 tensor of shape [rows, {NUM_STATS}], "
                    f"got {stats.dtype} {tuple(stats.shape)}",
        )
        torch._check(len(stat_rows) > 0 or stats.shape[0] == n,
                     lambda: f"instrumented_adam: stats has {stats.shape[0]} rows for {n} parameters")


def _check_companions(params: Sequence[Tensor], others: Sequence[Tensor], what: str,
                      allow_bfloat16: bool = False) -> None:
    """Each tensor of `others` goes with the parameter at its position: same shape and dtype.

    allow_bfloat16: the tensor may also be bfloat16 (compact epoch buffers: previous steps, θ_0).
    """
    for i, (p, t) in enumerate(zip(params, others)):
        torch._check(t.shape == p.shape, lambda: f"instrumented_adam: {what}[{i}] has shape {tuple(t.shape)} "
                                                 f"but its parameter has shape {tuple(p.shape)}")
        torch._check(t.dtype == p.dtype or (allow_bfloat16 and t.dtype == torch.bfloat16),
                     lambda: f"instrumented_adam: {what}[{i}] has dtype {t.dtype} "
                             f"but its parameter has dtype {p.dtype}" + (" (or bfloat16)" if allow_bfloat16 else ""))


@torch.library.register_fake("instrumented_adam::adam_step")
def _adam_step_fake(
    params, grads, exp_avgs, second_moments, max_second_moments, prev_epoch_steps, state_steps, *,
    algorithm, lr, lr_tensor, beta1, beta2, weight_decay, eps, amsgrad, maximize, grad_scale, found_inf,
    stats, stat_rows, histograms=None,
) -> None:
    n = len(params)
    torch._check(algorithm in (0, 1, 2), lambda: f"instrumented_adam: unknown algorithm {algorithm}")
    torch._check(
        len(grads) == n and len(exp_avgs) == n and len(second_moments) == n and len(state_steps) == n,
        lambda: "instrumented_adam: params, grads, exp_avgs, second moments and steps must have the same length",
    )
    uses_max = amsgrad and algorithm != Algorithm.ADAMAX
    torch._check(not uses_max or len(max_second_moments) == n,
                 lambda: "instrumented_adam: amsgrad needs one max_exp_avg_sq per parameter")
    torch._check(len(prev_epoch_steps) in (0, n),
                 lambda: "instrumented_adam: prev_epoch_steps must be empty or have one tensor per parameter")
    torch._check(len(stat_rows) in (0, n),
                 lambda: "instrumented_adam: stat_rows must be empty or have one row per parameter")
    for i, p in enumerate(params):
        torch._check(p.dtype in _KERNEL_DTYPES, lambda: "instrumented_adam: parameters must be float32, float64, "
                                                        f"bfloat16 or float16, got {p.dtype}")
        torch._check(state_steps[i].numel() == 1,
                     lambda: f"instrumented_adam: state_steps[{i}] must be a one-element tensor")
    _check_companions(params, grads, "grads")
    _check_companions(params, exp_avgs, "exp_avgs")
    _check_companions(params, second_moments, "second_moments")
    if uses_max:
        _check_companions(params, max_second_moments, "max_second_moments")
    _check_companions(params, prev_epoch_steps, "prev_epoch_steps", allow_bfloat16=True)
    _check_stats(stats, stat_rows, n)
    if histograms is not None:
        torch._check(stats is not None,
                     lambda: "instrumented_adam: histograms need stats (they are taken on statistics steps)")
        torch._check(
            histograms.dtype == torch.int64 and histograms.dim() == 3 and histograms.shape[0] == stats.shape[0]
            and histograms.shape[1] == HISTOGRAM_KINDS and histograms.shape[2] == HISTOGRAM_BINS,
            lambda: f"instrumented_adam: histograms must be a contiguous int64 tensor of shape "
                    f"[{stats.shape[0]}, {HISTOGRAM_KINDS}, {HISTOGRAM_BINS}], got {histograms.dtype} "
                    f"{tuple(histograms.shape)}",
        )
    return None


@torch.library.register_fake("instrumented_adam::epoch_geometry")
def _epoch_geometry_fake(params, epoch_starts, prev_steps, initial_params, has_prev, out) -> None:
    n = len(params)
    torch._check(len(epoch_starts) == n and len(prev_steps) == n and len(initial_params) in (0, n),
                 lambda: "instrumented_adam: params, epoch starts and previous steps must have the same length, "
                         "and initial params the same or none")
    _check_companions(params, epoch_starts, "epoch_starts")
    _check_companions(params, prev_steps, "prev_steps", allow_bfloat16=True)
    _check_companions(params, initial_params, "initial_params", allow_bfloat16=True)
    torch._check(
        out.dtype == torch.float64 and out.dim() == 2 and out.shape[0] == n and out.shape[1] == EPOCH_GEOMETRY_COLUMNS,
        lambda: f"instrumented_adam: out must be a float64 tensor of shape [{n}, {EPOCH_GEOMETRY_COLUMNS}], "
                f"got {out.dtype} {tuple(out.shape)}",
    )
    return None


@torch.library.register_fake("instrumented_adam::sum_of_squares")
def _sum_of_squares_fake(tensors, out) -> None:
    torch._check(out.dtype == torch.float64 and out.numel() == len(tensors),
                 lambda: f"instrumented_adam: out must be a float64 tensor of {len(tensors)} elements, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return None


# ---- the step with its scalars as tensors (for torch.compile) -------------------------------
# adam_step takes beta1, beta2, eps and weight_decay as `float`s (the kernels compute the per-step
# scalars on the host in double). Inside a torch.compile graph a float argument of an op is a
# constant: a value that changes between steps (a scheduler's lr or momentum as a Python float —
# OneCycleLR's cycle_momentum writes beta1 as a float every step; a tensor beta read with .item())
# is a guard that fails at every step, one recompile per step. This op takes them as tensors, so
# they are graph inputs, and reads them on the host when it runs: free for CPU tensors, which is
# where it is used (the step builds them from the Python values, or takes the user's CPU tensors).
_SCALAR_MUTATED = ("params", "grads", "exp_avgs", "second_moments", "max_second_moments", "prev_epoch_steps",
                   "state_steps", "stats", "histograms")


@torch.library.custom_op("instrumented_adam_py::adam_step_tensor_scalars", mutates_args=_SCALAR_MUTATED)
def adam_step_tensor_scalars(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], second_moments: list[Tensor],
    max_second_moments: list[Tensor], prev_epoch_steps: list[Tensor], state_steps: list[Tensor],
    scalars: Tensor, lr_tensor: Tensor | None, algorithm: int, amsgrad: bool, maximize: bool,
    grad_scale: Tensor | None, found_inf: Tensor | None, stats: Tensor | None, stat_rows: list[int],
    histograms: Tensor | None,
) -> None:
    """`adam_step` with [lr, beta1, beta2, eps, weight_decay] as one float64 CPU tensor `scalars`
    (lr is ignored when `lr_tensor` is given). Used by `core.functional` under torch.compile."""
    lr, beta1, beta2, eps, weight_decay = scalars.tolist()
    extra = {"histograms": histograms} if histograms is not None else {}
    adam_step(params, grads, exp_avgs, second_moments, max_second_moments, prev_epoch_steps, state_steps,
              algorithm=algorithm, lr=0.0 if lr_tensor is not None else lr, lr_tensor=lr_tensor, beta1=beta1,
              beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize,
              grad_scale=grad_scale, found_inf=found_inf, stats=stats, stat_rows=stat_rows, **extra)


@adam_step_tensor_scalars.register_fake
def _adam_step_tensor_scalars_fake(params, grads, exp_avgs, second_moments, max_second_moments, prev_epoch_steps,
                                   state_steps, scalars, lr_tensor, algorithm, amsgrad, maximize, grad_scale,
                                   found_inf, stats, stat_rows, histograms) -> None:
    torch._check(scalars.numel() == 5, lambda: "instrumented_adam: scalars must hold lr, beta1, beta2, eps, weight_decay")
    return _adam_step_fake(params, grads, exp_avgs, second_moments, max_second_moments, prev_epoch_steps, state_steps,
                           algorithm=algorithm, lr=0.0, lr_tensor=lr_tensor, beta1=0.0, beta2=0.0, weight_decay=0.0,
                           eps=0.0, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
                           stats=stats, stat_rows=stat_rows, histograms=histograms)
