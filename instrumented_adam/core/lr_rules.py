"""Learning-rate rules driven by the figures the instrumented optimizer already measures.

    opt = ia.Adam(model.parameters(), lr=1e-3)
    rule = AlignedEpochLR(opt, up=1.2, down=0.5)
    for epoch in range(epochs):
        train_one_epoch(...)                       # opt.step() as usual
        rule.step(opt.end_epoch())                 # or rule.step(recorder.end_epoch(...))

Rules read what the optimizer and `end_epoch()` produce — the epoch geometry (cos(s_k, s_{k−1})),
the step statistics (moments against the gradient), the loss the caller passes — and never make
an extra pass over the parameters to decide. Epoch rules read their figure on the host once per
epoch; per-step rules (`HypergradientLR`, `EveLR`) keep lr as a 0-dim tensor on the parameters'
device and update it with device ops only: no host synchronisation per step.

They follow torch's `LRScheduler` conventions (they subclass it, as `ReduceLROnPlateau` does, so
tooling that checks the type accepts them): `step(...)` with the figure the rule needs,
`get_last_lr()`, `state_dict()` / `load_state_dict()`. Each rule keeps a log of its decisions
(`Decision`: lr before and after, the figure that triggered it and its value) that
`pop_decisions()` hands out; the telemetry recorder writes it to the run store
(`Recorder.add_lr_rule`). This module has no store access.

Rules (see docs/lr-rules.md for the definitions and the study):

- `AlignedEpochLR`: lr × up while cos(s_k, s_{k−1}) > high, × down when it drops below low;
- `CarefulLR`: the bold driver: a loss rise beyond a tolerance cuts lr (and optionally rolls the
  parameters and the optimizer state back to the last accepted epoch end, bitwise); a run of
  improvements grows it gently;
- `EpochExtrapolation`: the talk's "EVE": probes the loss at θ + α·s_k on a geometric ladder of α
  and jumps to the best point (a few forward passes of the probe per epoch);
- `HypergradientLR`: hypergradient descent (Baydin et al. 2018) on the first moment, from the
  step statistics;
- `EveLR`: Koushik & Hayashi's Eve (2016): lr / d_t with d_t the smoothed relative loss change.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from .optimizer import INSTRUMENTATION_KEY
from .stats import EpochGeometry
from .table import STAT_INDEX

GLOBAL = -1  #: `Decision.group` of a decision taken for all param groups at once


@dataclass
class Decision:
    """One decision of a rule: what it saw and what it did to the learning rate."""

    rule: str
    epoch: int  # the epoch whose figures led to the decision (0-based)
    step: int  # the optimizer's step count when it was taken
    group: int  # the param group, or GLOBAL (-1) when taken for all groups
    action: str  # "up", "down", "hold", "cut", "rollback", "grow", "jump", "stay", "adapt"
    lr_before: float
    lr_after: float
    figure: str  # the figure that triggered it (cos_prev, loss, probe_loss, ...)
    value: float  # its value
    detail: dict[str, Any] = field(default_factory=dict)  # e.g. the probe curve

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lr_value(lr: Any) -> float:
    """A group's lr as a float (reads a device tensor: only where a sync is acceptable)."""
    return float(lr)


class LRRule(LRScheduler):
    """Base of the rules: torch's scheduler conventions plus a decision log.

    Not constructed through `LRScheduler.__init__` (which steps once with no figure); like
    `ReduceLROnPlateau`, `step()` takes the figure the rule needs.

    Args:
        optimizer: an instrumented optimizer (any subclass of the shared base; epoch rules need
            `end_epoch()`, `HypergradientLR` needs step statistics with a first moment).
        min_lr, max_lr: bounds every lr the rule sets stays within.
    """

    name = "rule"
    #: True for rules whose step() runs after every optimizer step.
    per_step = False

    def __init__(self, optimizer: torch.optim.Optimizer, *, min_lr: float = 0.0, max_lr: float = math.inf) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        if not (0.0 <= min_lr <= max_lr):
            raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
        self.optimizer = optimizer
        self.min_lr = float(min_lr)
        self.max_lr = float(max_lr)
        self.last_epoch = 0  # calls of step() so far (torch's name)
        self.base_lrs = [_lr_value(g["lr"]) for g in optimizer.param_groups]
        self._decisions: list[Decision] = []
        self._last_lr = list(self.base_lrs)

    # ---- torch's conventions ----------------------------------------------------------------
    def get_last_lr(self) -> list[float]:
        """The lr of each param group after the last step() (floats).

        For a per-step rule this reads the device tensors (a host sync): call it outside the
        training loop's hot path.
        """
        return [_lr_value(g["lr"]) for g in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:  # LRScheduler's abstract hook: the rule decides in step()
        return self.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        """Everything but the optimizer (torch's convention), decisions not yet handed out included."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "probe", "model")}
        state["_decisions"] = [d.to_dict() for d in self._decisions]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        state["_decisions"] = [Decision(**d) for d in state.get("_decisions", [])]
        self.__dict__.update(state)

    # ---- decisions --------------------------------------------------------------------------
    def pop_decisions(self) -> list[Decision]:
        """The decisions taken since the last call (the recorder writes them to the store)."""
        out, self._decisions = self._decisions, []
        return out

    def _clamp(self, lr: float) -> float:
        return min(max(lr, self.min_lr), self.max_lr)

    def _counters(self, geometry: Any = None) -> tuple[int, int]:
        """(epoch that just ended, step count) from the optimizer's counters."""
        opt = self.optimizer
        if isinstance(geometry, EpochGeometry):
            epoch = geometry.epoch
        elif isinstance(geometry, Mapping) and "epoch" in geometry:
            epoch = int(geometry["epoch"])
        else:
            epoch = int(getattr(opt, "epochs_done", self.last_epoch + 1)) - 1
        return epoch, int(getattr(opt, "steps_done", 0))

    def _set(self, group: dict, lr: float) -> None:
        if torch.is_tensor(group["lr"]):  # a tensor lr (a per-step rule's) stays the same tensor
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr

    def _finish(self) -> None:
        self.last_epoch += 1
        self._last_lr = self.get_last_lr()


class AlignedEpochLR(LRRule):
    """lr × `up` while consecutive epoch steps point the same way, × `down` when they do not.

    At each epoch end, with c = cos(s_k, s_{k−1}) (overall, or per param group with
    `per_group=True`): c > `high` multiplies lr by `up`, c < `low` by `down`, otherwise lr holds;
    the first epoch (no s_{k−1}, c is NaN) holds. lr stays within [min_lr, max_lr].

    `step(geometry)` takes what `opt.end_epoch()` returns (an `EpochGeometry`: per group possible)
    or the recorder's epoch row (a mapping with ``cos_prev``: overall only), or the cosine itself.
    """

    name = "aligned"

    def __init__(self, optimizer: torch.optim.Optimizer, *, up: float = 1.2, down: float = 0.5, high: float = 0.5,
                 low: float = 0.0, per_group: bool = False, min_lr: float = 0.0, max_lr: float = math.inf) -> None:
        super().__init__(optimizer, min_lr=min_lr, max_lr=max_lr)
        if not (up >= 1.0 and 0.0 < down <= 1.0):
            raise ValueError(f"need up >= 1 and 0 < down <= 1, got up={up}, down={down}")
        if not (-1.0 <= low <= high <= 1.0):
            raise ValueError(f"need -1 <= low <= high <= 1, got low={low}, high={high}")
        self.up, self.down, self.high, self.low = float(up), float(down), float(high), float(low)
        self.per_group = bool(per_group)

    def _cosines(self, geometry: Any) -> list[float]:
        n = len(self.optimizer.param_groups)
        if isinstance(geometry, EpochGeometry):
            level = "group" if self.per_group else "overall"
            values = geometry.derived(level)["cos_prev"].tolist()  # one read per epoch
            return values if self.per_group else values * n
        if self.per_group:
            raise ValueError("AlignedEpochLR(per_group=True) needs the EpochGeometry of opt.end_epoch()")
        if geometry is None:
            return [math.nan] * n
        value = geometry["cos_prev"] if isinstance(geometry, Mapping) else geometry
        return [float(value)] * n

    def step(self, geometry: EpochGeometry | Mapping[str, Any] | float | None = None) -> None:  # type: ignore[override]
        """Decides on this epoch's cos(s_k, s_{k−1}) (see the class)."""
        epoch, steps = self._counters(geometry)
        cosines = self._cosines(geometry)
        for gi, (group, c) in enumerate(zip(self.optimizer.param_groups, cosines)):
            before = _lr_value(group["lr"])
            if c > self.high:
                action, after = "up", self._clamp(before * self.up)
            elif c < self.low:
                action, after = "down", self._clamp(before * self.down)
            else:  # in between, or NaN (the first epoch)
                action, after = "hold", before
            self._set(group, after)
            if self.per_group or gi == 0:
                self._decisions.append(Decision(self.name, epoch, steps, gi if self.per_group else GLOBAL, action,
                                                before, after, "cos_prev", float(c)))
        self._finish()


class CarefulLR(LRRule):
    """The bold driver: cut lr when the monitored loss rises, grow it after a run of improvements.

    `step(loss)` at each epoch end with the monitored loss (training or validation). The first
    call accepts its loss as the reference. A loss above reference + `tolerance`·|reference| (or
    not finite) multiplies every lr by `factor`; with `rollback=True` the parameters, the
    optimizer's state (moments, step counts, epoch buffers) and, given `model`, its buffers are
    restored bitwise to the last accepted epoch end (kept on the device: one copy of the
    optimizer state and the parameters), and the reference stays; without rollback the new loss
    becomes the reference. An accepted loss becomes the reference; after `patience` accepted
    epochs in a row that improved on it, lr is multiplied by `grow`.

    The optimizer's counters (`steps_done`, `epochs_done`) keep counting through a rollback: the
    run's step and epoch numbers stay monotone, and the next epoch's step is measured from the
    restored point (its θ_end).
    """

    name = "careful"

    def __init__(self, optimizer: torch.optim.Optimizer, *, factor: float = 0.5, tolerance: float = 0.0,
                 grow: float = 1.05, patience: int = 3, rollback: bool = False, model: torch.nn.Module | None = None,
                 min_lr: float = 0.0, max_lr: float = math.inf) -> None:
        super().__init__(optimizer, min_lr=min_lr, max_lr=max_lr)
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        if not (tolerance >= 0.0 and grow >= 1.0 and int(patience) >= 1):
            raise ValueError(f"need tolerance >= 0, grow >= 1, patience >= 1, got {tolerance}, {grow}, {patience}")
        self.factor, self.tolerance, self.grow, self.patience = float(factor), float(tolerance), float(grow), int(patience)
        self.rollback = bool(rollback)
        self.model = model
        self.reference: float | None = None
        self.streak = 0
        self._snapshot: dict[str, Any] | None = None

    # ---- the snapshot of the last accepted epoch end ----------------------------------------
    def _params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @torch.no_grad()
    def _take_snapshot(self) -> None:
        snapshot = {
            "params": [p.detach().clone(memory_format=torch.preserve_format) for p in self._params()],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),  # tensors cloned, on their device
        }
        if self.model is not None:
            snapshot["buffers"] = {k: b.detach().clone() for k, b in self.model.named_buffers()}
        self._snapshot = snapshot

    @torch.no_grad()
    def _restore(self, lrs: Sequence[float]) -> None:
        opt, snap = self.optimizer, self._snapshot
        saved = copy.deepcopy(snap["optimizer"])
        counters = saved.get(INSTRUMENTATION_KEY)
        if counters is not None:  # keep counting: the run's step/epoch numbers stay monotone
            steps = int(getattr(opt, "steps_done", counters.get("steps_done", 0)))
            counters.update(steps_done=steps, epochs_done=int(getattr(opt, "epochs_done", 0)), steps_at_epoch_end=steps)
        for group, lr in zip(saved["param_groups"], lrs):
            group["lr"] = lr
        opt.load_state_dict(saved)
        for p, value in zip(self._params(), snap["params"]):
            p.copy_(value)
        if self.model is not None:
            buffers = dict(self.model.named_buffers())
            for k, value in snap.get("buffers", {}).items():
                buffers[k].copy_(value)

    def step(self, loss: float | Tensor) -> None:  # type: ignore[override]
        """Decides on this epoch's monitored loss (see the class)."""
        value = float(loss.detach() if torch.is_tensor(loss) else loss)
        epoch, steps = self._counters()
        groups = self.optimizer.param_groups
        before = [_lr_value(g["lr"]) for g in groups]
        ref = self.reference
        if ref is not None and (not math.isfinite(value) or value > ref + self.tolerance * abs(ref)):
            after = [self._clamp(lr * self.factor) for lr in before]
            self.streak = 0
            if self.rollback and self._snapshot is not None:
                self._restore(after)
                action = "rollback"
            else:
                for g, lr in zip(groups, after):
                    self._set(g, lr)
                self.reference = value if math.isfinite(value) else ref
                action = "cut"
        else:
            improved = ref is None or value < ref
            self.streak = self.streak + 1 if (improved and ref is not None) else 0
            after = before
            action = "hold"
            if self.streak >= self.patience:
                after = [self._clamp(lr * self.grow) for lr in before]
                for g, lr in zip(groups, after):
                    self._set(g, lr)
                self.streak = 0
                action = "grow"
            self.reference = value
            if self.rollback:
                self._take_snapshot()
        self._decisions.append(Decision(self.name, epoch, steps, GLOBAL, action, before[0], after[0], "loss", value,
                                        {"reference": ref}))
        self._finish()


class EpochExtrapolation(LRRule):
    """The talk's "EVE": look further along the epoch's step and take the larger step if it pays.

    `step()` right after `opt.end_epoch()`: evaluates `probe()` (the loss on a fixed probe batch
    set, a float or a 0-dim tensor) at θ_end(k) + α·s_k for α = 0 and then up the ladder
    `alphas` (default 0.25, 0.5, 1, 2, 4: powers of two, so α·s_k is exact), while the loss keeps
    falling; then moves the parameters to the best point with `opt.extrapolate_epoch_step(α*)`
    (the optimizer's epoch buffers follow: the next epoch is measured from where θ really is) or
    leaves them where they were. With `scale_lr=True` lr is also multiplied by 1 + α*, the
    factor by which the epoch's step was lengthened (within the bounds).

    Cost per epoch: 2 to len(alphas) + 1 evaluations of `probe` and as many passes that write
    the parameters; nothing per step. The probe curve is in the decision's detail.
    """

    name = "extrapolation"

    def __init__(self, optimizer: torch.optim.Optimizer, probe: Callable[[], float | Tensor], *,
                 alphas: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0), scale_lr: bool = False,
                 min_lr: float = 0.0, max_lr: float = math.inf) -> None:
        super().__init__(optimizer, min_lr=min_lr, max_lr=max_lr)
        if not hasattr(optimizer, "extrapolate_epoch_step"):
            raise TypeError(f"EpochExtrapolation needs an instrumented optimizer, got {type(optimizer).__name__}")
        alphas = [float(a) for a in alphas]
        if not alphas or any(a <= 0 for a in alphas) or sorted(alphas) != alphas or len(set(alphas)) != len(alphas):
            raise ValueError(f"alphas must be positive and strictly increasing, got {alphas}")
        self.probe = probe
        self.alphas = alphas
        self.scale_lr = bool(scale_lr)
        self.probe_evaluations = 0  # total probe() calls (the rule's cost)

    def _loss(self) -> float:
        self.probe_evaluations += 1
        with torch.no_grad():
            return float(self.probe())

    def step(self) -> float:  # type: ignore[override]
        """Probes, moves to the best ladder point (or stays); returns the α taken (0: stayed)."""
        opt = self.optimizer
        epoch, steps = self._counters()
        opt.probe_epoch_step(0.0)  # checks we are at an epoch end; θ = θ_end(k) exactly
        curve_a, curve_l = [0.0], [self._loss()]
        best_a, best_l = 0.0, curve_l[0]
        for a in self.alphas:
            opt.probe_epoch_step(a)
            loss = self._loss()
            curve_a.append(a)
            curve_l.append(loss)
            if not loss < best_l:  # stopped falling (or not finite)
                break
            best_a, best_l = a, loss
        before = [_lr_value(g["lr"]) for g in opt.param_groups]
        after = before
        if best_a > 0.0:
            opt.extrapolate_epoch_step(best_a)
            if self.scale_lr:
                after = [self._clamp(lr * (1.0 + best_a)) for lr in before]
                for g, lr in zip(opt.param_groups, after):
                    self._set(g, lr)
        else:
            opt.probe_epoch_step(0.0)
        self._decisions.append(Decision(self.name, epoch, steps, GLOBAL, "jump" if best_a > 0 else "stay", before[0],
                                        after[0], "probe_loss", best_l,
                                        {"alpha": best_a, "alphas": curve_a, "losses": curve_l}))
        self._finish()
        return best_a


class _PerStepRule(LRRule):
    """A rule stepped after every optimizer step: lr lives in a 0-dim device tensor per group.

    Decisions are summarised per epoch (lr at the start and end of the steps since the last
    `pop_decisions()` and the mean of the driving figure); reading them is the one host sync,
    taken when the recorder asks (at its epoch end), never in step().
    """

    per_step = True
    figure_name = ""

    def __init__(self, optimizer: torch.optim.Optimizer, *, min_lr: float = 0.0, max_lr: float = math.inf) -> None:
        super().__init__(optimizer, min_lr=min_lr, max_lr=max_lr)
        device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
        for g in optimizer.param_groups:
            if not torch.is_tensor(g["lr"]):
                g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float64, device=device)
        self._device = device
        n = len(optimizer.param_groups)
        self._lr_start = torch.stack([g["lr"].detach().clone() for g in optimizer.param_groups])
        self._figure_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self._count = 0  # host counter of steps in the summary (no sync)
        self._summary_epoch = int(getattr(optimizer, "epochs_done", 0))
        self._summary_step = int(getattr(optimizer, "steps_done", 0))

    def _update(self, new_lrs: Tensor, figure: Tensor) -> None:
        """Writes the new lrs in place (the optimizer reads the same tensors) and adds to the summary."""
        new_lrs = new_lrs.clamp(self.min_lr, self.max_lr)
        for gi, g in enumerate(self.optimizer.param_groups):
            g["lr"].copy_(new_lrs[gi])
        self._figure_sum += figure
        if self._count == 0:
            self._summary_epoch = int(getattr(self.optimizer, "epochs_done", 0))
        self._count += 1
        self._summary_step = int(getattr(self.optimizer, "steps_done", 0))
        self.last_epoch += 1

    def _lrs(self) -> Tensor:
        return torch.stack([g["lr"] for g in self.optimizer.param_groups]).to(torch.float64)

    def pop_decisions(self) -> list[Decision]:
        if self._count:
            start = self._lr_start.tolist()
            now = self._lrs()
            mean = (self._figure_sum / self._count).tolist()
            end = now.tolist()
            for gi in range(len(end)):
                action = "up" if end[gi] > start[gi] else ("down" if end[gi] < start[gi] else "hold")
                self._decisions.append(Decision(self.name, self._summary_epoch, self._summary_step, gi, action,
                                                start[gi], end[gi], self.figure_name, mean[gi],
                                                {"steps": self._count}))
            self._lr_start = now.detach().clone()
            self._figure_sum.zero_()
            self._count = 0
        return super().pop_decisions()


class HypergradientLR(_PerStepRule):
    """Hypergradient descent (Baydin et al., ICLR 2018) on the first moment, from the step figures.

    The hypergradient of the loss with respect to lr is −⟨g_t, d_{t−1}⟩ for the previous step
    direction d_{t−1}. The kernel measures, per step, Σ m_t·g_t and Σ g_t² (and Σ m_t²); since
    m_t = β1·m_{t−1} + (1−β1)·g_t they give, exactly, ⟨g_t, m_{t−1}⟩ = (Σ m_t·g_t − (1−β1)Σg²)/β1
    and ‖m_{t−1}‖² — the hypergradient along the momentum direction (Baydin et al.'s SGDN-HD
    form; Adam-HD's preconditioned m̂/√v̂ is not among the figures). Per param group, after each
    ``opt.step()``:

    - ``mode="multiplicative"`` (default; scale-free): lr ← lr·(1 + β·cos(g_t, m_{t−1}));
    - ``mode="additive"`` (the paper's form): lr ← lr + β·⟨g_t, m_{t−1}⟩.

    Device ops only (lr is a tensor in the group). Needs a first-moment optimizer with `betas`
    (Adam, AdamW, Adamax); with Adam's L2 weight_decay the moment is built from g + λθ and the
    identity is approximate.
    """

    name = "hypergradient"
    figure_name = "cos_grad_prev_exp_avg"

    def __init__(self, optimizer: torch.optim.Optimizer, *, hyper_lr: float = 0.02, mode: str = "multiplicative",
                 min_lr: float = 0.0, max_lr: float = math.inf) -> None:
        if mode not in ("multiplicative", "additive"):
            raise ValueError(f"mode must be 'multiplicative' or 'additive', got {mode!r}")
        missing = [k for k in ("exp_avg_dot_grad", "grad_sumsq", "exp_avg_sumsq") if k not in STAT_INDEX]
        if missing or not all("betas" in g for g in optimizer.param_groups):
            raise TypeError("HypergradientLR needs a first-moment optimizer (betas) whose step figures include "
                            f"exp_avg_dot_grad, grad_sumsq and exp_avg_sumsq (missing: {missing})")
        super().__init__(optimizer, min_lr=min_lr, max_lr=max_lr)
        self.hyper_lr = float(hyper_lr)
        self.mode = mode
        self._cols = [STAT_INDEX["exp_avg_dot_grad"], STAT_INDEX["grad_sumsq"], STAT_INDEX["exp_avg_sumsq"]]
        self._beta1 = torch.tensor([float(g["betas"][0]) for g in optimizer.param_groups], dtype=torch.float64,
                                   device=self._device)

    def step(self) -> None:  # type: ignore[override]
        """After ``opt.step()``: one hypergradient update of every group's lr (device ops only)."""
        stats = self.optimizer.last_step_statistics(copy=False)
        sums = stats.values[:, self._cols]
        n = len(self.optimizer.param_groups)
        per_group = torch.zeros(n, 3, dtype=torch.float64, device=sums.device).index_add_(0, stats.groups, sums)
        mg, gg, mm = per_group.unbind(1)
        b1 = self._beta1
        c = 1.0 - b1
        dot = (mg - c * gg) / b1  # ⟨g_t, m_{t−1}⟩
        prev_sq = (mm - 2.0 * c * mg + c * c * gg) / (b1 * b1)  # ‖m_{t−1}‖²
        denom = (prev_sq.clamp_min(0.0) * gg).sqrt()
        cos = torch.where(denom > 0, dot / denom, torch.zeros_like(dot)).clamp(-1.0, 1.0)
        lrs = self._lrs()
        if self.mode == "multiplicative":
            new = lrs * (1.0 + self.hyper_lr * cos)
        else:
            new = lrs + self.hyper_lr * dot
        self._update(new, cos)


class EveLR(_PerStepRule):
    """Koushik & Hayashi's Eve (arXiv:1611.01505, 2016) as a rule: lr_t = lr₀ / d_t.

    After each step, with the minibatch loss f_t (a 0-dim tensor, f* = 0 assumed as in the
    paper): the smoothed loss f̂ moves toward f_t by a factor clipped to [1/(K+1), 1/(k+1)] when
    it falls and [k+1, K+1] when it rises, r_t = |f̂_t − f̂_{t−1}| / min(f̂_t, f̂_{t−1}) and
    d_t = β3·d_{t−1} + (1−β3)·r_t (d₁ = 1). The paper divides √v̂ by d_t inside the Adam
    denominator; dividing lr instead scales ε by d_t as well (immaterial for ε ≪ √v̂).
    Device ops only.
    """

    name = "eve"
    figure_name = "eve_d"

    def __init__(self, optimizer: torch.optim.Optimizer, *, beta3: float = 0.999, k: float = 0.1, K: float = 10.0,
                 min_lr: float = 0.0, max_lr: float = math.inf) -> None:
        super().__init__(optimizer, min_lr=min_lr, max_lr=max_lr)
        if not (0.0 <= beta3 < 1.0 and 0.0 < k < K):
            raise ValueError(f"need 0 <= beta3 < 1 and 0 < k < K, got beta3={beta3}, k={k}, K={K}")
        self.beta3, self.k, self.K = float(beta3), float(k), float(K)
        self._lr0 = self._lrs().detach().clone()
        self._f_hat = torch.zeros((), dtype=torch.float64, device=self._device)
        self._d = torch.ones((), dtype=torch.float64, device=self._device)
        self._started = False  # host flag: the first loss only initialises f̂

    def step(self, loss: Tensor | float) -> None:  # type: ignore[override]
        """After ``opt.step()`` with that step's loss: updates d_t and every group's lr."""
        f = torch.as_tensor(loss, device=self._device).detach().to(torch.float64).reshape(())
        if not self._started:
            self._f_hat.copy_(f)
            self._started = True
        else:
            rising = f >= self._f_hat
            lo = torch.where(rising, torch.full_like(f, self.k + 1.0), torch.full_like(f, 1.0 / (self.K + 1.0)))
            hi = torch.where(rising, torch.full_like(f, self.K + 1.0), torch.full_like(f, 1.0 / (self.k + 1.0)))
            ratio = torch.where(self._f_hat > 0, f / self._f_hat, torch.ones_like(f))
            c = torch.minimum(torch.maximum(lo, ratio), hi)
            new_hat = c * self._f_hat
            low = torch.minimum(new_hat, self._f_hat)
            r = torch.where(low > 0, (new_hat - self._f_hat).abs() / low, torch.zeros_like(f))
            self._d.mul_(self.beta3).add_((1.0 - self.beta3) * r)
            self._f_hat.copy_(new_hat)
        self._update(self._lr0 / self._d, self._d.expand(len(self.optimizer.param_groups)))


RULES: dict[str, type[LRRule]] = {cls.name: cls for cls in (AlignedEpochLR, CarefulLR, EpochExtrapolation,
                                                              HypergradientLR, EveLR)}

__all__ = ["Decision", "GLOBAL", "LRRule", "AlignedEpochLR", "CarefulLR", "EpochExtrapolation", "HypergradientLR",
           "EveLR", "RULES"]
