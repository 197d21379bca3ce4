"""Per-step statistics and per-epoch geometry: the raw per-tensor sums and what derives from them.

The kernels produce sums per tensor (one row per parameter, columns named by `STAT_NAMES`).
Everything a user reads — norms, cosines, the update/parameter ratio, mean effective step
size — derives from those sums here, per tensor, per parameter group or overall. An overall
norm is the root of the summed squares (as Cockpit and Lightning report it), an overall cosine
the summed dot product over the product of those norms.

All figures stay torch tensors on the optimizer's device: reading them does not synchronise
with the GPU until the caller converts them (`.tolist()`, `float()`, `to_dict()`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .figures import EPOCH_FIGURE_FORMULAS, STEP_FIGURE_FORMULAS, Figure, figures_for
from .table import EPOCH_COLUMNS, EPOCH_STATS, NUM_STATS, STAT_INDEX, STAT_NAMES, STEP_STATS

Level = Literal["tensor", "group", "overall"]

#: The figures `StepStatistics.derived` and `EpochGeometry.derived` return, in order (the
#: recorder's and the store's columns): the declared formulas over this build's tables.
STEP_FIGURES: tuple[Figure, ...] = figures_for(STAT_NAMES, STEP_FIGURE_FORMULAS)
EPOCH_FIGURES: tuple[Figure, ...] = figures_for(EPOCH_COLUMNS, EPOCH_FIGURE_FORMULAS)

#: Columns reduced with a maximum instead of a sum when tensors are aggregated (the table says which).
MAX_COLUMNS = frozenset(s.name for s in (*STEP_STATS, *EPOCH_STATS) if s.is_max)


def _aggregate(values: Tensor, columns: tuple[str, ...], groups: Tensor, num_groups: int, level: Level) -> Tensor:
    """Sums (or maxima for MAX_COLUMNS) of per-tensor rows, per group or overall."""
    if level == "tensor":
        return values
    if level == "overall":
        out = values.sum(dim=0, keepdim=True)
        for name in MAX_COLUMNS.intersection(columns):
            j = columns.index(name)
            out[0, j] = values[:, j].max() if values.shape[0] else 0.0
        return out
    if level == "group":
        index = groups.to(values.device)
        out = torch.zeros(num_groups, values.shape[1], dtype=values.dtype, device=values.device)
        out.index_add_(0, index, values)
        for name in MAX_COLUMNS.intersection(columns):
            j = columns.index(name)
            out[:, j] = torch.zeros(num_groups, dtype=values.dtype, device=values.device).scatter_reduce(
                0, index, values[:, j], reduce="amax", include_self=True
            )
        return out
    raise ValueError(f"level must be 'tensor', 'group' or 'overall', got {level!r}")


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    """a / b, NaN where b is 0 (an undefined cosine or ratio is not 0 and not inf)."""
    return torch.where(b > 0, a / b, torch.full_like(a, float("nan")))


def _apply(figure: Figure, s: dict[str, Tensor]) -> Tensor:
    x = [s[name] for name in figure.inputs]
    if figure.kind == "norm":
        return x[0].sqrt()
    if figure.kind == "norm_ratio":
        return _safe_div(x[0].sqrt(), x[1].sqrt())
    if figure.kind == "cosine":
        return _safe_div(x[0], x[1].sqrt() * x[2].sqrt())
    if figure.kind == "mean":
        return _safe_div(x[0], s["numel"])
    return x[0]  # "value"


def evaluate(figures: tuple[Figure, ...], sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """The figures' values from aggregated sums (and `numel`), by figure name, in order."""
    return {f.name: _apply(f, sums) for f in figures}


@dataclass(frozen=True)
class _Table:
    """Rows of per-tensor sums with their parameter group and element count."""

    values: Tensor  # [num_tensors, len(columns)] float64
    numel: Tensor  # [num_tensors] float64
    groups: Tensor  # [num_tensors] int64, the param group of each row
    num_groups: int
    names: tuple[str, ...] | None  # parameter names when known (recorder/model), else None

    columns: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> Tensor:
        """The per-tensor column `name`."""
        return self.values[:, self.columns.index(name)]

    def sums(self, level: Level = "overall") -> dict[str, Tensor]:
        """The raw sums (maxima for eff_lr_max) per tensor, group or overall, by column name."""
        rows = _aggregate(self.values, self.columns, self.groups, self.num_groups, level)
        out = {name: rows[:, j] for j, name in enumerate(self.columns)}
        counts = _aggregate(self.numel[:, None], ("numel",), self.groups, self.num_groups, level)[:, 0]
        out["numel"] = counts
        return out


@dataclass(frozen=True)
class StepStatistics(_Table):
    """The statistics of one optimizer step, one row per parameter (all groups, in order).

    `values[:, j]` is the sum named `STAT_NAMES[j]` (csrc/stats_table.h defines them).
    Parameters without a gradient at that step have a zero row and count 0 in `numel` (as the
    optimizer hands it out), so the per-element means of a group or overall (second_moment_mean,
    eff_lr_mean) average over the elements that took the step, not over frozen ones.
    """

    prev_step_sumsq: Tensor | None = None  # ‖s_{k-1}‖² per tensor, when an epoch has ended
    step: int = 0  # the optimizer's step count after this step
    columns: tuple[str, ...] = STAT_NAMES

    def derived(self, level: Level = "overall") -> dict[str, Tensor]:
        """The step figures (core.figures.STEP_FIGURES) per tensor, group or overall.

        grad_norm, exp_avg_norm, update_norm, param_norm: L2 norms;
        update_to_param: ‖Δθ‖/‖θ‖; cos_update_grad, cos_exp_avg_grad: cosines;
        cos_update_prev_epoch: cosine of the step with the previous epoch's step (NaN before the
        first epoch ends); second_moment_mean, eff_lr_mean: per-element means; eff_lr_max;
        nonfinite_grads: count; any further sum of the table as itself.
        """
        s = self.sums(level)
        if self.prev_step_sumsq is not None:
            s["prev_step_sumsq"] = _aggregate(self.prev_step_sumsq[:, None], ("p",), self.groups, self.num_groups,
                                              level)[:, 0]
        else:
            s["prev_step_sumsq"] = torch.full_like(s["numel"], float("nan"))
        return evaluate(STEP_FIGURES, s)


@dataclass(frozen=True)
class EpochGeometry(_Table):
    """The geometry of one epoch's step s_k = θ_end(k) − θ_end(k−1), one row per parameter.

    Columns (EPOCH_COLUMNS): ‖s_k‖², ⟨s_k, s_{k−1}⟩, ‖s_{k−1}‖² and ‖θ − θ_0‖², computed in
    float64. θ_0 is where instrumentation began (the first step, or the checkpoint it resumed from
    if that checkpoint came from torch.optim).
    """

    epoch: int = 0  # index of the epoch that just ended (0 for the first)
    has_previous: bool = False  # False for the first epoch: no s_{k-1} yet
    columns: tuple[str, ...] = EPOCH_COLUMNS

    def derived(self, level: Level = "overall") -> dict[str, Tensor]:
        """The epoch figures (core.figures.EPOCH_FIGURES): step_norm ‖s_k‖, prev_step_norm,
        step_dot_prev, cos_prev (NaN for the first epoch), distance_from_init."""
        out = evaluate(EPOCH_FIGURES, self.sums(level))
        if not self.has_previous and "cos_prev" in out:  # no s_{k-1} yet: the angle is undefined
            out["cos_prev"] = torch.full_like(out["cos_prev"], float("nan"))
        return out


__all__ = [
    "STAT_NAMES", "STAT_INDEX", "NUM_STATS", "EPOCH_COLUMNS", "STEP_FIGURES", "EPOCH_FIGURES", "StepStatistics",
    "EpochGeometry", "evaluate",
]
