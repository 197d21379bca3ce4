"""The reference: the same updates and statistics written plainly with tensor operations.

Read it next to Algorithm 1 of Kingma & Ba (2015), "Adam: A Method for Stochastic
Optimization" (Adamax is its Algorithm 2; AdamW is Loshchilov & Hutter's decoupled decay).
It is meant to be obviously right, not fast: the tests run it in float64 and compare the kernels
with it. Symbols: θ parameters, g gradient, m first moment, v second moment, u infinity norm,
t step, α learning rate, β1 β2 decay rates, ε, λ weight decay.
"""

from __future__ import annotations


import torch
from torch import Tensor

from ._ops import STAT_NAMES, Algorithm


@torch.no_grad()
def step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    second_moment: Tensor,
    max_second_moment: Tensor | None,
    step_number: int,
    *,
    algorithm: Algorithm,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
    prev_epoch_step: Tensor | None = None,
) -> dict[str, float]:
    """Updates param, exp_avg, second_moment (and max_second_moment) in place for step t =
    `step_number` (counted from 1) and returns the step's statistics, keyed by STAT_NAMES."""
    theta_before = param.clone()
    g = grad  # as stored in p.grad: the statistics use it before maximize / weight decay
    t = step_number
    d = -g if maximize else g.clone()  # the direction the moments see
    if weight_decay != 0:
        if algorithm == Algorithm.ADAMW:
            param.mul_(1 - lr * weight_decay)  # θ ← θ(1 − αλ), decoupled from the moments
        else:
            d = d + weight_decay * param  # L2: g ← g + λθ
    exp_avg.mul_(beta1).add_((1 - beta1) * d)  # m ← β1·m + (1 − β1)·g
    bias_correction1 = 1 - beta1**t
    if algorithm == Algorithm.ADAMAX:
        # u ← max(β2·u, |g| + ε);  θ ← θ − α/(1 − β1^t) · m/u
        torch.maximum(second_moment * beta2, d.abs() + eps, out=second_moment)
        denom = second_moment
        moment = second_moment
        step_size = lr / bias_correction1
        param.sub_(step_size * exp_avg / denom)
    else:
        second_moment.mul_(beta2).add_((1 - beta2) * d * d)  # v ← β2·v + (1 − β2)·g²
        moment = second_moment
        if amsgrad:
            torch.maximum(max_second_moment, second_moment, out=max_second_moment)
            moment = max_second_moment
        m_hat = exp_avg / bias_correction1  # m̂ = m/(1 − β1^t)
        v_hat = moment / (1 - beta2**t)  # v̂ = v/(1 − β2^t)
        denom = (v_hat.sqrt() + eps) * bias_correction1  # so that α·m/denom = α·m̂/(√v̂ + ε)
        param.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    delta = param - theta_before
    eff_lr = lr / denom  # per-element effective step size
    g64, m64, delta64 = g.double(), exp_avg.double(), delta.double()
    stats = {
        "grad_sumsq": (g64 * g64).sum(),
        "exp_avg_sumsq": (m64 * m64).sum(),
        "second_moment_sum": moment.double().sum(),
        "update_sumsq": (delta64 * delta64).sum(),
        "param_sumsq": (param.double() ** 2).sum(),
        "update_dot_grad": (delta64 * g64).sum(),
        "exp_avg_dot_grad": (m64 * g64).sum(),
        "update_dot_prev_epoch": (delta64 * prev_epoch_step.double()).sum() if prev_epoch_step is not None else 0.0,
        "nonfinite_grads": (~torch.isfinite(g)).sum(),
        "eff_lr_sum": eff_lr.double().sum(),
        "eff_lr_max": eff_lr.double().max() if eff_lr.numel() else 0.0,
    }
    assert tuple(stats) == STAT_NAMES, "the reference must follow the one statistics table"
    return {k: float(v) for k, v in stats.items()}


def epoch_geometry(theta_end: Tensor, theta_prev_end: Tensor, prev_step: Tensor | None, theta_0: Tensor) -> dict[str, float]:
    """‖s_k‖², ⟨s_k, s_{k−1}⟩, ‖s_{k−1}‖², ‖θ − θ_0‖² in float64, s_k = θ_end(k) − θ_end(k−1)."""
    s = theta_end.double() - theta_prev_end.double()
    q = prev_step.double() if prev_step is not None else torch.zeros_like(s)
    d = theta_end.double() - theta_0.double()
    return {
        "step_sumsq": float((s * s).sum()),
        "step_dot_prev": float((s * q).sum()),
        "prev_step_sumsq": float((q * q).sum()),
        "distance_sumsq": float((d * d).sum()),
    }


__all__ = ["step", "epoch_geometry"]
