"""The figures a user reads, each declared once as a formula over the statistics tables' sums.

The kernels produce sums (core.table, from csrc/stats_table.h); everything shown — norms, cosines,
ratios, per-element means — is one of the few formula kinds below applied to named sums. The
recorder's columns, the store's, the analysis's labels and the plots' axes all come from these
declarations. A sum that no formula consumes is recorded as itself, so a statistic added to the
table reaches the recorder's rows, the store and the exports with no edit here.

This module imports neither torch nor the op library: the analysis layer reads labels from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

Kind = Literal["norm", "norm_ratio", "cosine", "mean", "value"]

#: How many inputs each kind takes, and what it computes from them (s: sums, n: element count).
KIND_FORMULAS: dict[str, str] = {
    "norm": "√s₀",
    "norm_ratio": "√s₀ / √s₁ (NaN where s₁ = 0)",
    "cosine": "s₀ / (√s₁·√s₂) (NaN where either norm is 0)",
    "mean": "s₀ / n, the per-element mean (NaN where n = 0)",
    "value": "s₀ as it is",
}
_ARITY = {"norm": 1, "norm_ratio": 2, "cosine": 3, "mean": 1, "value": 1}


@dataclass(frozen=True)
class Figure:
    """A figure derived from sums: `kind` applied to `inputs` (names of sums)."""

    name: str
    kind: Kind
    inputs: tuple[str, ...]
    label: str  # short, for axes and tables (plain Unicode, no markup)

    def __post_init__(self) -> None:
        if len(self.inputs) != _ARITY[self.kind]:
            raise ValueError(f"figure {self.name}: kind {self.kind} takes {_ARITY[self.kind]} inputs")

    @property
    def formula(self) -> str:
        """The formula in words, with the input names substituted."""
        text = KIND_FORMULAS[self.kind]
        for i, name in enumerate(self.inputs):
            text = text.replace(f"s{'₀₁₂'[i]}", name)
        return text


#: The step figures, in column order. `prev_step_sumsq` (‖s_{k−1}‖², kept with the epoch buffers)
#: is the one input that is not a step sum; it is NaN until an epoch has ended.
STEP_FIGURE_FORMULAS: tuple[Figure, ...] = (
    Figure("grad_norm", "norm", ("grad_sumsq",), "‖g‖"),
    Figure("exp_avg_norm", "norm", ("exp_avg_sumsq",), "‖m‖"),
    Figure("update_norm", "norm", ("update_sumsq",), "‖Δθ‖"),
    Figure("param_norm", "norm", ("param_sumsq",), "‖θ‖"),
    Figure("update_to_param", "norm_ratio", ("update_sumsq", "param_sumsq"), "‖Δθ‖/‖θ‖"),
    Figure("cos_update_grad", "cosine", ("update_dot_grad", "update_sumsq", "grad_sumsq"), "cos(Δθ, g)"),
    Figure("cos_exp_avg_grad", "cosine", ("exp_avg_dot_grad", "exp_avg_sumsq", "grad_sumsq"), "cos(m, g)"),
    Figure("second_moment_mean", "mean", ("second_moment_sum",), "second moment, mean element"),
    Figure("eff_lr_mean", "mean", ("eff_lr_sum",), "effective lr, mean element"),
    Figure("eff_lr_max", "value", ("eff_lr_max",), "effective lr, largest element"),
    Figure("update_dot_grad", "value", ("update_dot_grad",), "Σ⟨Δθ, g⟩ (predicted loss change)"),
    Figure("nonfinite_grads", "value", ("nonfinite_grads",), "non-finite gradient elements"),
    Figure("cos_update_prev_epoch", "cosine", ("update_dot_prev_epoch", "update_sumsq", "prev_step_sumsq"),
           "cos(Δθ, s_k−1)"),
)

#: The epoch figures, from the epoch table's sums. cos_prev is NaN for the first epoch.
EPOCH_FIGURE_FORMULAS: tuple[Figure, ...] = (
    Figure("step_norm", "norm", ("step_sumsq",), "epoch step norm ‖s_k‖"),
    Figure("prev_step_norm", "norm", ("prev_step_sumsq",), "previous epoch step norm ‖s_k−1‖"),
    Figure("step_dot_prev", "value", ("step_dot_prev",), "⟨s_k, s_k−1⟩"),
    Figure("cos_prev", "cosine", ("step_dot_prev", "step_sumsq", "prev_step_sumsq"), "cos(s_k, s_k−1)"),
    Figure("distance_from_init", "norm", ("distance_sumsq",), "distance from init ‖θ−θ₀‖"),
)

#: Inputs that formulas may use besides a table's own sums.
EXTRA_INPUTS: frozenset[str] = frozenset({"prev_step_sumsq"})


def figures_for(sums: Iterable[str], formulas: tuple[Figure, ...]) -> tuple[Figure, ...]:
    """The figures derivable from the sums named `sums`: every declared formula whose inputs exist
    (or are EXTRA_INPUTS), then a `value` figure for each sum that no formula consumes."""
    names = tuple(sums)
    available = set(names) | EXTRA_INPUTS
    chosen = [f for f in formulas if all(i in available for i in f.inputs)]
    consumed = {i for f in chosen for i in f.inputs} | {f.name for f in chosen}
    chosen += [Figure(name, "value", (name,), name) for name in names if name not in consumed]
    return tuple(chosen)


#: Epoch aggregates of every step figure over the epoch's recorded steps (columns `<figure>_<agg>`).
AGGREGATE_KINDS: tuple[str, ...] = ("mean", "min", "max")


def aggregate_names(figures: Iterable[str]) -> tuple[str, ...]:
    """`<f>_mean`, `<f>_min`, `<f>_max` for each step figure f, the epoch rows' aggregate columns."""
    return tuple(f"{f}_{a}" for f in figures for a in AGGREGATE_KINDS)


def label(name: str) -> str:
    """A human label for a figure or aggregate column name (the name itself when unknown)."""
    known = {f.name: f.label for f in (*STEP_FIGURE_FORMULAS, *EPOCH_FIGURE_FORMULAS)}
    if name in known:
        return known[name]
    for agg in AGGREGATE_KINDS:
        base = name[: -len(agg) - 1]
        if name.endswith("_" + agg) and base in known:
            return f"{known[base]} ({agg})"
    return name


__all__ = [
    "Figure", "KIND_FORMULAS", "STEP_FIGURE_FORMULAS", "EPOCH_FIGURE_FORMULAS", "EXTRA_INPUTS",
    "figures_for", "AGGREGATE_KINDS", "aggregate_names", "label",
]
