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
from .histogram import (FIRST_EXPONENT_BIN, HISTOGRAM_BINS, HISTOGRAM_NAMES, MIN_EXPONENT, NONFINITE_BIN, OVERFLOW_BIN,
                        UNDERFLOW_BIN)


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
        moment = second_moment
        step_size = lr / bias_correction1
        param.sub_(step_size * exp_avg / second_moment)
    else:
        second_moment.mul_(beta2).add_((1 - beta2) * d * d)  # v ← β2·v + (1 − β2)·g²
        moment = second_moment
        if amsgrad:
            torch.maximum(max_second_moment, second_moment, out=max_second_moment)
            moment = max_second_moment
        m_hat = exp_avg / bias_correction1  # m̂ = m/(1 − β1^t)
        v_hat = moment / (1 - beta2**t)  # v̂ = v/(1 − β2^t)
        param.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    # α·m̂/(√v̂ + ε) = effective_lr · m (Adamax: α/(1 − β1^t) · m/u = effective_lr · m)
    eff_lr = effective_lr(moment, t, algorithm=algorithm, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    row = statistics(theta_before, param, g, exp_avg, moment, eff_lr, prev_epoch_step)
    return dict(zip(STAT_NAMES, row.tolist()))


def effective_lr(
    moment: Tensor,
    step_number: int | Tensor,
    *,
    algorithm: Algorithm,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> Tensor:
    """The per-element effective step size of step t, in `moment`'s dtype.

    Adam/AdamW: α / ((√(v/(1 − β2^t)) + ε)·(1 − β1^t)), the factor that multiplies m in the update;
    Adamax: α / ((1 − β1^t)·u). `moment` is the one in the denominator after the step (max v for
    amsgrad); t may be a tensor (a state step), so nothing here reads a value on the host.
    """
    bias_correction1 = 1 - beta1**step_number
    if algorithm == Algorithm.ADAMAX:
        return lr / (bias_correction1 * moment)
    v_hat = moment / (1 - beta2**step_number)
    return lr / ((v_hat.sqrt() + eps) * bias_correction1)


def statistics(
    theta_before: Tensor,
    theta_after: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    moment: Tensor,
    eff_lr: Tensor,
    prev_epoch_step: Tensor | None = None,
) -> Tensor:
    """One tensor's step statistics, in float64, in STAT_NAMES order: a [NUM_STATS] tensor.

    From what the step observed: θ before and after (Δθ is their difference as stored), the
    gradient as stored in p.grad (before maximize and weight decay), m_t, the moment in the
    denominator and the effective step size per element (`effective_lr`); s_{k−1} when tracked.
    """
    def f64(t: Tensor) -> Tensor:  # one float64 vector (dot products take 1-D operands)
        return t.reshape(-1).double()

    g, m, theta, eff = f64(grad), f64(exp_avg), f64(theta_after), f64(eff_lr)
    delta = f64(theta_after - theta_before)
    zero = torch.zeros((), dtype=torch.float64, device=theta_after.device)
    stats = {
        "grad_sumsq": torch.dot(g, g),
        "exp_avg_sumsq": torch.dot(m, m),
        "second_moment_sum": f64(moment).sum(),
        "update_sumsq": torch.dot(delta, delta),
        "param_sumsq": torch.dot(theta, theta),
        "update_dot_grad": torch.dot(delta, g),
        "exp_avg_dot_grad": torch.dot(m, g),
        "update_dot_prev_epoch": torch.dot(delta, f64(prev_epoch_step)) if prev_epoch_step is not None else zero,
        "nonfinite_grads": (~torch.isfinite(grad)).sum().double(),
        "eff_lr_sum": eff.sum(),
        "eff_lr_max": eff.max() if eff.numel() else zero,
    }
    if tuple(stats) != STAT_NAMES:
        raise AssertionError("the reference must follow the one statistics table")
    return torch.stack([v.to(device=zero.device, dtype=torch.float64) for v in stats.values()])


def histogram_bins(values: Tensor) -> Tensor:
    """The log2 bin of each |value| (`core.histogram` defines them), from frexp in float64."""
    x = values.reshape(-1).double().abs()
    _, exponent = torch.frexp(x)  # x = m·2^e with m in [0.5, 1): floor(log2 x) = e - 1
    bins = (exponent.long() - 1 - MIN_EXPONENT + FIRST_EXPONENT_BIN).clamp(UNDERFLOW_BIN, OVERFLOW_BIN)
    bins = torch.where(x == 0, torch.zeros_like(bins), bins)
    return torch.where(torch.isfinite(x), bins, torch.full_like(bins, NONFINITE_BIN))


def histograms(theta_before: Tensor, theta_after: Tensor, grad: Tensor, eff_lr: Tensor) -> Tensor:
    """One tensor's step histograms of |g|, |Δθ| and the effective step size: [HISTOGRAM_KINDS,
    HISTOGRAM_BINS] int64 counts (Δθ is the difference of θ as stored)."""
    values = {"grad_abs": grad, "update_abs": theta_after - theta_before, "eff_lr": eff_lr}
    if tuple(values) != HISTOGRAM_NAMES:
        raise AssertionError("the reference must follow the one histogram table")
    return torch.stack([torch.bincount(histogram_bins(v).cpu(), minlength=HISTOGRAM_BINS) for v in values.values()])


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


__all__ = ["step", "effective_lr", "statistics", "epoch_geometry"]
