"""The functional layer: one instrumented step over plain lists of tensors, no Optimizer object.

Like `torch.optim.adam.adam`, these functions take the tensors of a step (parameters, gradients,
the optimizer state) and the hyperparameters, update everything in place and return nothing.
The optimizer classes of `core.optimizer` call them once per parameter group; any other caller
that keeps its own state (a ZeroRedundancyOptimizer shard, an optimizer-in-backward hook, a
distributed wrapper) can call them the same way:

    import torch
    from instrumented_adam import NUM_STATS, functional

    params = [torch.randn(10), torch.randn(3, 4)]
    grads = [torch.randn_like(p) for p in params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    stats = torch.zeros(len(params), NUM_STATS, dtype=torch.float64)  # one row per tensor

    functional.adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, stats=stats,
                    lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    # stats[i, STAT_INDEX["update_sumsq"]] is ‖Δθ_i‖², and so on for every STAT_NAMES column.

What the fused path (the default) expects of its tensors, as the compiled op checks them: all on
one device, a float32/float64/bfloat16/float16 parameter and its gradient and state tensors in the
same dtype, shape and dense memory layout, complex tensors only with `has_complex=True` (then
updated as `view_as_real` pairs, as torch.optim does), state steps one-element float32/float64
tensors (on the parameters' device for CUDA, on the CPU for CPU), incremented by the call. An
optimizer that must cope with anything else (non-dense parameters, gradients in another layout)
re-lays the tensors out around the call, as `core.optimizer` does.

`differentiable=True` runs torch's own single-tensor math (`torch.optim.adam.adam` /
`torch.optim.adamax.adamax` with differentiable=True), so autograd can differentiate through the
step (meta-learning) exactly as through torch.optim's; the statistics then come from the plain
formulas of `core.reference`. Cost: torch's for-loop step (several kernels per tensor instead of
one fused pass: ~6 ms against ~0.7 ms fused for 1M fp32 parameters on one CPU thread), plus, when
`stats` is given, one parameter-sized copy per tensor (θ before the step) and about fifteen
float64 passes per tensor for the statistics (another 20-40 ms for those 1M parameters, so 4-8x
torch's differentiable step). It is meant for small models and meta-learning loops, not for
large-scale training; `statistics=False` on the optimizer skips the measuring.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam
from torch.optim.adamax import adamax as _torch_adamax

from . import reference
from ._ops import NUM_STATS, Algorithm, adam_step, adam_step_tensor_scalars


def _check_hyperparameters(lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """torch.optim's constructor checks, with its messages (a tensor lr is checked by the op).

    Only Python numbers are compared: a value check on a tensor would synchronise with the GPU
    (and break a torch.compile graph), so tensor hyperparameters are left to the op.
    """
    if torch.compiler.is_compiling():
        # In a graph a comparison of a changing float is a guard on its value (a recompile per
        # step under a scheduler): checked when the step runs eagerly, and by the classes'
        # constructors (torch.optim's); torch's own functional adam never checks them.
        return
    if not (isinstance(lr, Tensor) or isinstance(beta1, Tensor) or isinstance(beta2, Tensor)
            or isinstance(eps, Tensor) or isinstance(weight_decay, Tensor)):  # the hot path: one test
        if 0.0 <= lr and 0.0 <= eps and 0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0 and 0.0 <= weight_decay:
            return
    checks = (
        (lr, lambda x: 0.0 <= x, f"Invalid learning rate: {lr}"),
        (eps, lambda x: 0.0 <= x, f"Invalid epsilon value: {eps}"),
        (beta1, lambda x: 0.0 <= x < 1.0, f"Invalid beta parameter at index 0: {beta1}"),
        (beta2, lambda x: 0.0 <= x < 1.0, f"Invalid beta parameter at index 1: {beta2}"),
        (weight_decay, lambda x: 0.0 <= x, f"Invalid weight_decay value: {weight_decay}"),
    )
    for value, valid, message in checks:
        if not isinstance(value, Tensor) and not valid(value):
            raise ValueError(message)


def _scalars_on_host(params: Sequence[Tensor], *scalars: float | Tensor) -> bool:
    """Whether the step's scalars can be read on the host for free: CPU parameters (the tensor-scalar
    op is for them; a CUDA step reads only lr on the device) and no scalar on another device."""
    if params and params[0].device.type != "cpu":
        return False
    return all(not isinstance(x, Tensor) or x.device.type == "cpu" for x in scalars)


def _as_real(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


def _fused(
    algorithm: Algorithm,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    second_moments: Sequence[Tensor],
    max_second_moments: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    prev_epoch_steps: Sequence[Tensor],
    stats: Tensor | None,
    stat_rows: Sequence[int],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    has_complex: bool,
    histograms: Tensor | None = None,
) -> None:
    """One call of the compiled op (its C++ glue validates the tensors before mutating any)."""
    if torch.is_grad_enabled():
        # The op mutates its inputs and has no autograd formula: a caller outside torch.optim's
        # no_grad step (a hook, a wrapper) must not record it.
        with torch.no_grad():
            return _fused(algorithm, params, grads, exp_avgs, second_moments, max_second_moments, state_steps,
                          prev_epoch_steps, stats, stat_rows, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                          weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale,
                          found_inf=found_inf, has_complex=has_complex, histograms=histograms)
    if has_complex:
        params, grads, exp_avgs = _as_real(params), _as_real(grads), _as_real(exp_avgs)
        second_moments, max_second_moments = _as_real(second_moments), _as_real(max_second_moments)
        prev_epoch_steps = _as_real(prev_epoch_steps)
    lr_tensor = lr if isinstance(lr, Tensor) else None
    if torch.compiler.is_compiling() and _scalars_on_host(params, lr, beta1, beta2, eps, weight_decay):
        # In a graph: the scalars as a tensor input, not constants guarded on their value (a
        # scheduler changing beta1 or lr would recompile every step; see _ops.adam_step_tensor_scalars).
        # (torch.full, not torch.as_tensor: Dynamo keeps a changing float symbolic only through the former.)
        scalars = torch.stack([x.detach().to(torch.float64).reshape(()) if isinstance(x, Tensor)
                               else torch.full((), x, dtype=torch.float64)
                               for x in (0.0 if lr_tensor is not None else lr, beta1, beta2, eps, weight_decay)])
        adam_step_tensor_scalars(
            list(params), list(grads), list(exp_avgs), list(second_moments), list(max_second_moments),
            list(prev_epoch_steps), list(state_steps), scalars, lr_tensor, int(algorithm), bool(amsgrad),
            bool(maximize), grad_scale, found_inf, stats, list(stat_rows), histograms)
        return
    adam_step(
        # The op's schema takes lists; the classes pass lists (no copy on their hot path).
        params if isinstance(params, list) else list(params),
        grads if isinstance(grads, list) else list(grads),
        exp_avgs if isinstance(exp_avgs, list) else list(exp_avgs),
        second_moments if isinstance(second_moments, list) else list(second_moments),
        max_second_moments if isinstance(max_second_moments, list) else list(max_second_moments),
        prev_epoch_steps if isinstance(prev_epoch_steps, list) else list(prev_epoch_steps),
        state_steps if isinstance(state_steps, list) else list(state_steps),
        algorithm=int(algorithm),
        lr=0.0 if lr_tensor is not None else float(lr),
        lr_tensor=lr_tensor,
        beta1=float(beta1),
        beta2=float(beta2),
        weight_decay=float(weight_decay),
        eps=float(eps),
        amsgrad=bool(amsgrad),
        maximize=bool(maximize),
        grad_scale=grad_scale,
        found_inf=found_inf,
        stats=stats,
        stat_rows=stat_rows if isinstance(stat_rows, list) else list(stat_rows),
        histograms=histograms,
    )


def _check_differentiable_inputs(
    params: Sequence[Tensor],
    lists: dict[str, Sequence[Tensor]],
    state_steps: Sequence[Tensor],
    lr: float | Tensor,
    stats: Tensor | None,
    stat_rows: Sequence[int],
) -> None:
    """What the compiled op would check, for the path that does not call it."""
    n = len(params)
    for name, values in lists.items():
        optional = name == "prev_epoch_steps"  # empty: the column stays 0
        if len(values) != n and not (optional and len(values) == 0):
            raise RuntimeError(f"instrumented_adam: {name} has {len(values)} tensors for {n} parameters")
    if any(torch.is_tensor(s) and s.requires_grad for s in state_steps):
        raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
    if torch.is_tensor(lr) and lr.numel() != 1:
        raise RuntimeError(f"instrumented_adam: lr must be a one-element tensor, got shape {list(lr.shape)}")
    if stats is not None:
        device = params[0].device if n else stats.device
        if (stats.device != device or stats.dtype != torch.float64 or stats.dim() != 2
                or stats.shape[1] != NUM_STATS or not stats.is_contiguous()):
            raise RuntimeError(
                f"instrumented_adam: stats must be a contiguous float64 tensor of shape [rows, {NUM_STATS}] on "
                f"{device}, got {stats.dtype} {list(stats.shape)} on {stats.device}"
            )
        rows = list(stat_rows) if stat_rows else list(range(n))
        if (stat_rows and len(rows) != n) or (not stat_rows and stats.shape[0] != n):
            raise RuntimeError(f"instrumented_adam: stats has {stats.shape[0]} rows for {n} parameters")
        if len(set(rows)) != len(rows) or any(not 0 <= r < stats.shape[0] for r in rows):
            raise RuntimeError(f"instrumented_adam: stat_rows {rows} must be distinct rows of stats")


def _differentiable(
    algorithm: Algorithm,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    second_moments: Sequence[Tensor],
    max_second_moments: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    prev_epoch_steps: Sequence[Tensor],
    stats: Tensor | None,
    stat_rows: Sequence[int],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    has_complex: bool,
    histograms: Tensor | None = None,
) -> None:
    """torch's differentiable single-tensor step, then the statistics by the reference formulas.

    Runs in the caller's grad mode (torch.optim's step enables grad for differentiable=True).
    AMP: a step with found_inf set is skipped whole, as the fused op does (this reads found_inf on
    the host); gradients are unscaled out of place, so the stored gradients keep their scale.
    """
    adamax = algorithm == Algorithm.ADAMAX
    amsgrad = bool(amsgrad) and not adamax
    lists = {"grads": grads, "exp_avgs": exp_avgs, "second moments": second_moments, "state_steps": state_steps,
             "prev_epoch_steps": prev_epoch_steps}
    if amsgrad:
        lists["max_second_moments"] = max_second_moments
        if len(max_second_moments) != len(params):
            raise RuntimeError("instrumented_adam: amsgrad needs one max_exp_avg_sq per parameter")
    _check_differentiable_inputs(params, lists, state_steps, lr, stats, stat_rows)
    if histograms is not None:
        if stats is None:
            raise RuntimeError("instrumented_adam: histograms need stats (they are taken on statistics steps)")
        with torch.no_grad():
            histograms.zero_()
    if stats is not None:
        with torch.no_grad():
            stats.zero_()
    if found_inf is not None and bool(found_inf.item()):
        return
    if grad_scale is not None:
        grads = [g / grad_scale for g in grads]
    before = None
    if stats is not None:
        before = [(torch.view_as_real(p) if p.is_complex() else p).detach().clone() for p in params]

    # torch.optim's functions may replace list entries (complex views): hand them copies.
    if adamax:
        _torch_adamax(
            list(params), list(grads), list(exp_avgs), list(second_moments), list(state_steps),
            foreach=False, maximize=maximize, differentiable=True, capturable=False, has_complex=has_complex,
            eps=eps, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay,
        )
    else:
        _torch_adam(
            list(params), list(grads), list(exp_avgs), list(second_moments), list(max_second_moments),
            list(state_steps), foreach=False, capturable=False, differentiable=True, fused=False,
            has_complex=has_complex, decoupled_weight_decay=algorithm == Algorithm.ADAMW,
            amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=maximize,
        )

    if stats is None:
        return
    moments = second_moments if not amsgrad else max_second_moments
    lr_value = lr.detach() if torch.is_tensor(lr) else lr
    with torch.no_grad():
        for i, p in enumerate(params):
            real = [torch.view_as_real(t) if t.is_complex() else t
                    for t in (p.detach(), grads[i].detach(), exp_avgs[i].detach(), moments[i].detach())]
            prev = None
            if prev_epoch_steps:
                prev = prev_epoch_steps[i]
                prev = torch.view_as_real(prev) if prev.is_complex() else prev
            # In float64, from the stored moment: the kernel's figure without its fp32 rounding.
            eff_lr = reference.effective_lr(real[3].double(), state_steps[i].detach().double(), algorithm=algorithm,
                                            lr=lr_value, beta1=beta1, beta2=beta2, eps=eps)
            row = stat_rows[i] if stat_rows else i
            stats[row] = reference.statistics(before[i], real[0], real[1], real[2], real[3], eff_lr, prev).to(
                stats.device)
            if histograms is not None:
                histograms[row] = reference.histograms(before[i], real[0], real[1], eff_lr).to(histograms.device)


def adam(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    prev_epoch_steps: Sequence[Tensor] = (),
    stats: Tensor | None = None,
    stat_rows: Sequence[int] = (),
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_complex: bool = False,
    differentiable: bool = False,
    histograms: Tensor | None = None,
) -> None:
    """One Adam (or, with `decoupled_weight_decay=True`, AdamW) step over lists of tensors, measured.

    Updates `params`, `exp_avgs`, `exp_avg_sqs` (and `max_exp_avg_sqs` when amsgrad) in place and
    increments `state_steps`, with the numerics of `torch.optim.Adam(fused=True)`.

    Args:
        params, grads, exp_avgs, exp_avg_sqs, state_steps: one entry per parameter, as torch's
            `adam` takes them.
        max_exp_avg_sqs: one per parameter when `amsgrad`, else empty.
        lr: a float, or a one-element tensor (on the parameters' device for CUDA, CPU for CPU).
        beta1, beta2, eps, weight_decay, amsgrad, maximize: as in `torch.optim.Adam`.
        decoupled_weight_decay: AdamW's decay θ ← θ(1 − lr·λ) instead of the L2 gradient term.
        prev_epoch_steps: the previous epoch's step s_{k−1} per parameter, for the statistic
            `update_dot_prev_epoch`; empty leaves that column 0.
        stats: a contiguous [rows, NUM_STATS] float64 tensor on the parameters' device; when given
            it is zeroed and parameter i's statistics are written into row `stat_rows[i]` (row i
            when `stat_rows` is empty). None runs the plain update.
        grad_scale, found_inf: GradScaler's tensors: gradients are unscaled in place, and the
            step is skipped whole (steps not incremented, statistics zero) when found_inf ≠ 0.
        has_complex: some tensors are complex; they are updated as `view_as_real` pairs.
        differentiable: step with torch's differentiable math so autograd can differentiate
            through it (see the module docstring for its cost).
        histograms: a contiguous [rows, HISTOGRAM_KINDS, HISTOGRAM_BINS] int64 tensor beside `stats`
            (which it needs), zeroed and filled with parameter i's log2 histograms of |g|, |Δθ| and
            the effective step size in row `stat_rows[i]` (`core.histogram` defines the bins).
    """
    _check_hyperparameters(lr, beta1, beta2, eps, weight_decay)
    algorithm = Algorithm.ADAMW if decoupled_weight_decay else Algorithm.ADAM
    step = _differentiable if differentiable else _fused
    step(algorithm, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, prev_epoch_steps, stats,
         stat_rows, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
         maximize=maximize, grad_scale=grad_scale, found_inf=found_inf, has_complex=has_complex,
         histograms=histograms)


def adamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    **kwargs,
) -> None:
    """`adam` with decoupled weight decay (`torch.optim.AdamW`'s step); same arguments."""
    adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, decoupled_weight_decay=True, **kwargs)


def adamax(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_infs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    prev_epoch_steps: Sequence[Tensor] = (),
    stats: Tensor | None = None,
    stat_rows: Sequence[int] = (),
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_complex: bool = False,
    differentiable: bool = False,
    histograms: Tensor | None = None,
) -> None:
    """One Adamax step over lists of tensors, measured: `torch.optim.Adamax`'s single-tensor
    update, operation for operation, with the statistics of `adam` (the second moment is the
    infinity norm u = `exp_infs`, the effective step size lr / (bc1 · u)). Arguments as `adam`."""
    _check_hyperparameters(lr, beta1, beta2, eps, weight_decay)
    step = _differentiable if differentiable else _fused
    step(Algorithm.ADAMAX, params, grads, exp_avgs, exp_infs, (), state_steps, prev_epoch_steps, stats, stat_rows,
         lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=maximize,
         grad_scale=grad_scale, found_inf=found_inf, has_complex=has_complex, histograms=histograms)


__all__ = ["adam", "adamw", "adamax"]
