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


#: Prefixes FSDP1 and activation checkpointing put into parameter names (torch's own
#: ``clean_tensor_name`` strips the same ones).
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name without the wrappers' prefixes: ``_fsdp_wrapped_module.0.weight`` -> ``0.weight``."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class ShardCombiner:
    """Combines the per-rank raw sums of a sharded optimizer into the whole model's.

    Under FSDP2 (DTensor parameters) and FSDP1 (flat parameters, or the original parameters with
    ``use_orig_params=True``) every rank's optimizer holds the same tensors, each rank its shard of
    each: a statistics row is the same parameter on every rank, and its global value combines the
    ranks' rows with each statistic's combine kind (core.table: sums and counts add, maxima take
    the maximum). Under ``ZeroRedundancyOptimizer`` each rank's local optimizer owns whole
    parameters: its rows are scattered to their places among all of the wrapper's parameters
    first (the other ranks contribute nothing to them), so the global rows are every parameter's.

    `reduce` does it for any number of tensors with one ``all_reduce`` of the sum-kind columns and
    one of the max-kind columns: the recorder calls it once per flush of the step ring and once
    per epoch end, never per step. Every rank must call it at the same points (they do: the
    recorders of all ranks see the same steps, flushes and epoch ends).
    """

    def __init__(self, kind: str, wrapper: Any, optimizer: Any, description: str) -> None:
        if kind not in ("shards", "partition"):
            raise ValueError(f"kind must be 'shards' or 'partition', got {kind!r}")
        self.kind = kind
        self.description = description
        self._wrapper = wrapper
        self._optimizer = optimizer
        self._index_key: tuple | None = None
        self._index: torch.Tensor | None = None

    def global_params(self) -> list[list[torch.Tensor]]:
        """The parameters of the global rows, per param group."""
        owner = self._wrapper if self.kind == "partition" else self._optimizer
        return [list(g["params"]) for g in owner.param_groups]

    def _row_index(self, device: torch.device) -> torch.Tensor | None:
        """Global row of each local row (None: the same rows on every rank)."""
        if self.kind != "partition":
            return None
        local = [p for g in self._optimizer.param_groups for p in g["params"]]
        everything = [p for group in self.global_params() for p in group]
        key = (tuple(map(id, local)), tuple(map(id, everything)))
        if key != self._index_key or self._index is None or self._index.device != device:
            where = {id(p): i for i, p in enumerate(everything)}
            missing = [i for i, p in enumerate(local) if id(p) not in where]
            if missing:
                raise RuntimeError(f"instrumented_adam: local parameters {missing} are not among the "
                                   "ZeroRedundancyOptimizer's parameters")
            self._index = torch.tensor([where[id(p)] for p in local], dtype=torch.long, device=device)
            self._index_key = key
        return self._index

    def global_groups(self, device: torch.device) -> tuple[torch.Tensor, int]:
        """The param group of each global row, and the number of groups."""
        groups = self.global_params()
        index = [g for g, params in enumerate(groups) for _ in params]
        return torch.tensor(index, dtype=torch.long, device=device), len(groups)

    def reduce(self, parts: Sequence[tuple[torch.Tensor, Sequence[str]]]) -> list[torch.Tensor]:
        """The global values of per-row tensors: each part is ([..., rows, C], combine kind per column).

        Returns float64 tensors [..., global rows, C] (the same on every rank). Two collectives in
        all, whatever the number of parts: one SUM over the sum and count columns, one MAX over
        the max columns (none when no part has one).
        """
        import torch.distributed as dist  # noqa: PLC0415 (present wherever a combiner is built)

        if not parts:
            return []
        device = parts[0][0].device
        index = self._row_index(device)
        total = sum(len(g) for g in self.global_params()) if index is not None else None
        laid_out, sums, maxes = [], [], []
        for values, kinds in parts:
            values = values.to(torch.float64)
            if values.shape[-1] != len(kinds):
                raise ValueError(f"{values.shape[-1]} columns but {len(kinds)} combine kinds")
            max_cols = [j for j, k in enumerate(kinds) if k == "max"]
            sum_cols = [j for j, k in enumerate(kinds) if k != "max"]
            if index is not None:
                full = torch.zeros((*values.shape[:-2], total, values.shape[-1]), dtype=torch.float64, device=device)
                if max_cols:  # rows this rank does not own must not win a maximum
                    full[..., max_cols] = -math.inf
                full.index_copy_(values.dim() - 2, index, values)
                values = full
            laid_out.append((values, sum_cols, max_cols))
            sums.append(values[..., sum_cols].reshape(-1))
            if max_cols:
                maxes.append(values[..., max_cols].reshape(-1))
        summed = torch.cat(sums)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        maximum = None
        if maxes:
            maximum = torch.cat(maxes)
            dist.all_reduce(maximum, op=dist.ReduceOp.MAX)
        out, s_at, m_at = [], 0, 0
        for values, sum_cols, max_cols in laid_out:
            result = torch.empty_like(values)
            n = values[..., sum_cols].numel()
            result[..., sum_cols] = summed[s_at : s_at + n].reshape(*values.shape[:-1], len(sum_cols))
            s_at += n
            if max_cols:
                n = values[..., max_cols].numel()
                result[..., max_cols] = maximum[m_at : m_at + n].reshape(*values.shape[:-1], len(max_cols))
                m_at += n
            out.append(result)
        return out

    def names(self, model: Any) -> list[str]:
        """Names of the global rows: the model's parameter names without wrapper prefixes; an
        FSDP1 flat parameter is named by the original parameters it holds, joined by ``+``
        (its sums are theirs together: a flat parameter is one statistics row)."""
        known: dict[int, str] = {}
        if model is not None:
            for name, p in model.named_parameters(remove_duplicate=False):
                known.setdefault(id(p), clean_name(name))
        out = []
        for i, p in enumerate(q for group in self.global_params() for q in group):
            name = known.get(id(p), f"param.{i}")
            fqns = getattr(p, "_fqns", None) if getattr(p, "_is_flat_param", False) else None
            if fqns:
                stem = name[: -len("_flat_param")] if name.endswith("_flat_param") else ""
                name = "+".join(stem + clean_name(f) for f in fqns)
            out.append(name)
        return out


def shard_combiner(wrapper: Any, optimizer: Any, world_size: int) -> ShardCombiner | None:
    """The combiner a sharded optimizer's figures need, or None when each rank's figures are the
    whole model's already (one process, DDP's replicas).

    Recognised: ``ZeroRedundancyOptimizer`` (each rank a partition of the parameters), DTensor
    parameters (FSDP2's ``fully_shard``), FSDP1's flat parameters, and the original parameters of
    FSDP1 with ``use_orig_params=True`` (FSDP marks them ``_fsdp_flattened``).
    """
    if world_size <= 1:
        return None
    if type(wrapper).__name__ == "ZeroRedundancyOptimizer" and getattr(wrapper, "optim", None) is optimizer:
        return ShardCombiner("partition", wrapper, optimizer, "ZeroRedundancyOptimizer: each rank owns whole parameters")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(type(p).__name__ == "DTensor" for p in params):
        return ShardCombiner("shards", wrapper, optimizer, "FSDP2 (DTensor parameters)")
    if any(getattr(p, "_is_flat_param", False) for p in params):
        return ShardCombiner("shards", wrapper, optimizer, "FSDP (flat parameters)")
    if any(getattr(p, "_fsdp_flattened", False) for p in params):
        return ShardCombiner("shards", wrapper, optimizer, "FSDP (use_orig_params=True)")
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
    "unwrap_optimizer", "ShardCombiner", "shard_combiner", "clean_name", "process_rank", "rank_disagreement", "report_disagreement", "check_choice",
]
