"""The compiled ops (csrc/ops.cpp holds their schemas) and their fake kernels for torch.compile."""

from __future__ import annotations

from enum import IntEnum

import torch

from .table import NUM_STATS, STAT_INDEX, STAT_NAMES  # noqa: F401  (re-exported; loads the library)


class Algorithm(IntEnum):
    """The `algorithm` argument of the fused step (csrc/adam_math.h keeps the same values)."""

    ADAM = 0
    ADAMW = 1
    ADAMAX = 2


#: The Adam family's step (Adam, AdamW, Adamax): the Python layer calls it by this name.
adam_step = torch.ops.instrumented_adam.fused_step
epoch_geometry = torch.ops.instrumented_adam.epoch_geometry
sum_of_squares = torch.ops.instrumented_adam.sum_of_squares


@torch.library.register_fake("instrumented_adam::fused_step")
def _fused_step_fake(
    params, grads, exp_avgs, second_moments, max_second_moments, prev_epoch_steps, state_steps, *,
    algorithm, lr, lr_tensor, beta1, beta2, weight_decay, eps, amsgrad, maximize, grad_scale, found_inf,
    stats, stat_rows,
) -> None:
    # The op only mutates its arguments in place: nothing to allocate.
    return None


@torch.library.register_fake("instrumented_adam::epoch_geometry")
def _epoch_geometry_fake(params, epoch_starts, prev_steps, initial_params, has_prev, out) -> None:
    return None


@torch.library.register_fake("instrumented_adam::sum_of_squares")
def _sum_of_squares_fake(tensors, out) -> None:
    return None
