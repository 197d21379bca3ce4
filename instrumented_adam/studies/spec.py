"""Branch specs: what a branch is (parent, epoch, overrides, epochs, seed), its content id, the
optimizer it trains with, the lr schedule, and sweeps (grids of overrides × seeds × epochs).

A spec's id is a hash of its content — the parent's identity (its run's name and start time, or
the sha256 of a plain checkpoint file), the branch epoch, the overrides, the epochs to train and
the seed — so asking for the same branch again finds it in the study's store instead of training
it again. Overrides are validated by constructing the optimizer they describe (torch's own
messages: "Invalid learning rate: -1.0") before anything trains.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..core import optimizer as _optim

#: Optimizer classes a branch can switch to, by name. The instrumented ones record every figure;
#: the Adam family (Adam, AdamW) shares its state layout, so the moments carry over between them.
#: torch.optim's SGD and RMSprop have no statistics: their branches record epoch rows (losses, lr)
#: only (`instrumented_adam.studies.plain`).
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"Adam": _optim.Adam, "AdamW": _optim.AdamW, "Adamax": _optim.Adamax,
                                                      "SGD": torch.optim.SGD, "RMSprop": torch.optim.RMSprop}
#: The optimizers whose runs the `Recorder` records (statistics kernels).
INSTRUMENTED = frozenset({"Adam", "AdamW", "Adamax"})
#: Families whose optimizer state loads into one another.
_STATE_FAMILY = {"Adam": "adam", "AdamW": "adam", "Adamax": "adamax"}

#: Override keys that are not constructor arguments of the optimizer.
STUDY_KEYS = ("optimizer", "schedule")


def _normal(value: Any) -> Any:
    """JSON-stable form of an override value (tuples as lists, floats as floats)."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return float(value)
    raise TypeError(f"an override is a number, a bool, a string or a list of them, got {value!r}")


def parse_value(text: str) -> Any:
    """An override value from the command line: ``3e-4`` → float, ``0.9,0.99`` → list, ``true``."""
    text = text.strip()
    if "," in text:
        return [parse_value(t) for t in text.split(",") if t.strip()]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_assignment(text: str) -> tuple[str, Any]:
    """``lr=3e-4`` → ("lr", 3e-4)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"an override is KEY=VALUE, got {text!r}")
    return key.strip(), parse_value(value)


# ---- lr schedules (stateless: a function of the epoch, so a continuation needs no state) ------
def schedule_lr(schedule: str, base_lr: float, epoch: int, horizon: int) -> float:
    """The lr of `epoch` (0-based) under `schedule`, with `base_lr` at epoch 0.

    ``constant``; ``cosine`` (to 1% of base_lr at `horizon` epochs, as the demo's
    CosineAnnealingLR); ``cosine:H`` (horizon H); ``exp:G`` (base_lr·G^epoch);
    ``step:E:G`` (×G every E epochs).
    """
    kind, *args = str(schedule).split(":")
    if kind == "constant" and not args:
        return float(base_lr)
    if kind == "cosine" and len(args) <= 1:
        h = int(args[0]) if args else int(horizon)
        eta_min = base_lr * 0.01
        e = min(epoch, h)
        return float(eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * e / h)) / 2)
    if kind == "exp" and len(args) == 1:
        return float(base_lr * float(args[0]) ** epoch)
    if kind == "step" and len(args) == 2:
        return float(base_lr * float(args[1]) ** (epoch // int(args[0])))
    raise ValueError(f"unknown lr schedule {schedule!r}: constant, cosine[:H], exp:G or step:E:G")


def check_schedule(schedule: str) -> None:
    """Raises ValueError for a schedule `schedule_lr` does not know (or with bad numbers)."""
    lr = schedule_lr(schedule, 1.0, 3, 10)
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"the lr schedule {schedule!r} gives lr={lr} at epoch 3")


def optimizer_settings(cls_name: str, base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments of optimizer `cls_name`: `base` (the parent's) updated with
    `overrides`, keeping only what `cls_name`'s constructor takes (Adam's betas reach Adamax,
    AdamW's decoupled flag is AdamW's own)."""
    if cls_name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cls_name!r}; choose from {', '.join(OPTIMIZERS)}")
    cls = OPTIMIZERS[cls_name]
    torch_cls = next(c for c in cls.__mro__ if c.__module__.startswith("torch.optim"))  # our classes wrap torch's
    accepted = set(inspect.signature(torch_cls.__init__).parameters)
    accepted = {p for p in accepted if p not in ("self", "params")} - {"decoupled_weight_decay", "fused", "foreach",
                                                                        "capturable", "differentiable"}
    merged = {k: v for k, v in base.items() if k in accepted}
    for key, value in overrides.items():
        if key in STUDY_KEYS:
            continue
        if key not in accepted:
            raise ValueError(f"override {key!r} is not an argument of {cls_name} (it takes {', '.join(sorted(accepted))})")
        merged[key] = tuple(value) if isinstance(value, list) else value
    return merged


def build_optimizer(cls_name: str, params: Iterable[torch.Tensor], settings: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer `cls_name` with `settings` (the instrumented ones with statistics on)."""
    return OPTIMIZERS[cls_name](params, **settings)


def validate(cls_name: str, base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Checks overrides with the optimizer's own rules (constructs it on a dummy tensor); returns
    the constructor settings. Raises ValueError with torch's message."""
    settings = optimizer_settings(cls_name, base, overrides)
    if "schedule" in overrides:
        check_schedule(overrides["schedule"])
    try:
        build_optimizer(cls_name, [torch.zeros(1, requires_grad=True)], settings)
    except (ValueError, TypeError) as e:
        raise ValueError(f"overrides {dict(overrides)} are not valid for {cls_name}: {e}") from e
    return settings


def same_state_family(a: str, b: str) -> bool:
    """Whether optimizer `b` can load the state of optimizer `a` (its moments carry over)."""
    return _STATE_FAMILY.get(a) == _STATE_FAMILY.get(b)


@dataclass(frozen=True)
class BranchSpec:
    """One branch: from `parent` (an identity string, see `parent_identity`) at `at_epoch`,
    with `overrides`, for `epochs` epochs, seeded `seed` (None: the parent's seed and RNG state,
    i.e. its own continuation when there are no overrides)."""

    parent: str
    at_epoch: int
    overrides: tuple[tuple[str, Any], ...] = ()
    epochs: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        if int(self.at_epoch) < 0 or int(self.epochs) < 1:
            raise ValueError(f"a branch starts at an epoch >= 0 and trains >= 1 epoch, got {self.at_epoch}, {self.epochs}")
        items = dict(self.overrides.items() if isinstance(self.overrides, Mapping) else self.overrides)
        object.__setattr__(self, "overrides", tuple(sorted((str(k), _normal(v)) for k, v in items.items())))

    @property
    def override_dict(self) -> dict[str, Any]:
        return dict(self.overrides)

    def to_dict(self) -> dict[str, Any]:
        return {"parent": self.parent, "at_epoch": int(self.at_epoch), "overrides": self.override_dict,
                "epochs": int(self.epochs), "seed": self.seed}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BranchSpec":
        return cls(d["parent"], int(d["at_epoch"]), tuple(dict(d.get("overrides") or {}).items()), int(d["epochs"]),
                   d.get("seed"))

    @property
    def id(self) -> str:
        """16 hex digits of the sha256 of the spec's canonical JSON."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def label(self) -> str:
        """A short human name: ``@50 lr=0.0003 s1``."""
        parts = [f"@{self.at_epoch}"]
        parts += [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in self.overrides]
        if self.seed is not None:
            parts.append(f"s{self.seed}")
        return " ".join(parts)


def grid(grid: Mapping[str, Sequence[Any]] | None = None, overrides: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Override sets: the cartesian product of `grid` (key → values), or the list `overrides`,
    or both (each list entry combined with each grid point)."""
    points: list[dict[str, Any]] = [{}]
    if grid:
        keys = list(grid)
        points = [dict(zip(keys, combo)) for combo in itertools.product(*(list(grid[k]) for k in keys))]
    if overrides:
        points = [{**o, **p} for o in overrides for p in points]
    return points


def sweep_specs(parent: str, at_epochs: Sequence[int], override_sets: Sequence[Mapping[str, Any]], epochs: int,
                seeds: Sequence[int | None]) -> list[BranchSpec]:
    """Every (branch epoch × override set × seed), in that order, without duplicates."""
    out: dict[str, BranchSpec] = {}
    for at in at_epochs:
        for o in override_sets:
            for s in seeds:
                spec = BranchSpec(parent, int(at), tuple(dict(o).items()), int(epochs), s)
                out.setdefault(spec.id, spec)
    return list(out.values())


__all__ = ["BranchSpec", "OPTIMIZERS", "INSTRUMENTED", "STUDY_KEYS", "parse_value", "parse_assignment", "schedule_lr", "check_schedule",
           "optimizer_settings", "build_optimizer", "validate", "same_state_family", "grid", "sweep_specs"]
