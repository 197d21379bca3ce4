"""Recording under torch.distributed, and optimizers wrapped by training frameworks.

Under a process group (DDP, a torchrun job) every rank runs the same training loop, and with it
the same `Recorder` calls. By default only rank 0 records: the others get an *inactive* recorder
whose `end_epoch` still ends the optimizer's epoch (every rank's optimizer state, epoch buffers
included, must stay the same as rank 0's) but which opens no store, writes no row and saves no
checkpoint file. ``ranks="all"`` makes every rank record its own run, named ``<name>@rank<r>``, for
debugging; rank r > 0 writes it into its own file beside rank 0's, ``<stem>.rank<r><suffix>`` (one
SQLite file per writing process). ``check_ranks=True`` compares, at every epoch end, the figures each rank measured
(the overall step figures of the epoch's last step and the epoch geometry) with one small
``all_gather_object`` — for data-parallel training they must agree; a disagreement is reported
(warned or raised) and recorded as the epoch metric ``rank_disagreement``.

Frameworks hand the training loop their own wrapper of the optimizer (Accelerate's
``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``, ``ZeroRedundancyOptimizer`` which
holds a local optimizer over its partition): `unwrap_optimizer` finds the instrumented one inside.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch

#: Who records under a process group.
RECORDING_RANKS = ("zero", "all")
#: What a rank disagreement found by ``check_ranks`` does.
ON_RANK_MISMATCH = ("warn", "raise")
#: The epoch metric a rank check records (the largest relative difference to rank 0's figures).
RANK_DISAGREEMENT_METRIC = "rank_disagreement"

# Attributes under which frameworks keep the optimizer they wrap: Accelerate's
# AcceleratedOptimizer and Hugging Face (`optimizer`), Lightning's LightningOptimizer
# (`_optimizer`), torch's ZeroRedundancyOptimizer (`optim`, the local optimizer of the partition).
_WRAPPED_ATTRIBUTES = ("optimizer", "_optimizer", "optim")


class RankMismatchError(RuntimeError):
    """The ranks of a data-parallel training measured different figures (``check_ranks=True``)."""


def is_instrumented(optimizer: Any) -> bool:
    """Whether `optimizer` is one of ours (it measures its steps)."""
    return hasattr(optimizer, "last_step_statistics") and hasattr(optimizer, "steps_done")


def unwrap_optimizer(optimizer: Any, max_depth: int = 4) -> Any:
    """The instrumented optimizer inside framework wrappers (or `optimizer` itself).

    Follows ``.optimizer``, ``._optimizer`` and ``.optim`` up to `max_depth` levels; returns the
    argument unchanged when nothing instrumented is found (the caller then reports it).
    """
    current = optimizer
    for _ in range(max_depth + 1):
        if is_instrumented(current):
            return current
        inner = next((getattr(current, a) for a in _WRAPPED_ATTRIBUTES
                      if getattr(current, a, None) is not None and getattr(current, a) is not current), None)
        if inner is None:
            break
        current = inner
    return optimizer


def partial_figures_note(wrapper: Any, optimizer: Any, world_size: int) -> str | None:
    """Why this rank's figures are not the whole model's, or None when they are.

    A ZeroRedundancyOptimizer's local optimizer holds only its rank's partition of the
    parameters, and FSDP shards each parameter: figures summed over them are partial sums.
    Combining them across ranks into the global figures is not implemented yet; the recorder
    says so instead of recording partial sums as if they were the model's.
    """
    if world_size <= 1:
        return None
    if type(wrapper).__name__ == "ZeroRedundancyOptimizer":
        mine = sum(len(g["params"]) for g in optimizer.param_groups)
        return (f"ZeroRedundancyOptimizer: the figures are those of this rank's partition ({mine} tensors), "
                "not of the whole model")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor" for p in params):
        return "FSDP (DTensor parameters): the figures are those of this rank's shards, not of the whole model"
    if any(getattr(p, "_is_flat_param", False) or type(p).__name__ == "FlatParameter" for p in params):
        return "FSDP (flat parameters): the figures are those of this rank's shard, not of the whole model"
    return None


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process under torch.distributed; (0, 1) without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def check_choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def rank_disagreement(values: Sequence[float], rtol: float) -> tuple[float, list[int]]:
    """Gathers `values` from every rank (one collective; every rank must call it at the same
    point) and compares them with rank 0's: (largest relative difference, ranks beyond `rtol`).

    NaN equals NaN (a figure that does not exist yet, such as the angle of the first epoch);
    a NaN against a number is a disagreement of +inf.
    """
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, [float(v) for v in values])
    reference = gathered[0]
    worst, offenders = 0.0, []
    for rank, theirs in enumerate(gathered[1:], start=1):
        rank_worst = 0.0
        if len(theirs) != len(reference):
            rank_worst = math.inf
        else:
            for a, b in zip(reference, theirs):
                if math.isnan(a) and math.isnan(b):
                    continue
                if math.isnan(a) or math.isnan(b):
                    rank_worst = math.inf
                    continue
                if a == b:  # equal infinities too
                    continue
                rank_worst = max(rank_worst, abs(a - b) / max(abs(a), abs(b), 1e-300))
        if rank_worst > rtol:
            offenders.append(rank)
        worst = max(worst, rank_worst)
    return worst, offenders


def report_disagreement(epoch: int, worst: float, offenders: list[int], on_mismatch: str) -> None:
    """Warns about (or raises on) ranks whose figures disagree with rank 0's."""
    if not offenders:
        return
    message = (
        f"instrumented_adam: at the end of epoch {epoch} the optimizer figures of rank(s) {offenders} differ from "
        f"rank 0's (largest relative difference {worst:.3g}): the ranks no longer train the same model "
        "(a rank skipped a step, saw other gradients, or its state was loaded differently)"
    )
    if on_mismatch == "raise":
        raise RankMismatchError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


__all__ = [
    "RECORDING_RANKS", "ON_RANK_MISMATCH", "RANK_DISAGREEMENT_METRIC", "RankMismatchError", "is_instrumented",
    "unwrap_optimizer", "partial_figures_note", "process_rank", "rank_disagreement", "report_disagreement", "check_choice",
]
