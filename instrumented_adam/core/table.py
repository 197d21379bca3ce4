"""The statistics tables, as the compiled library defines them (csrc/stats_table.h).

Every figure's name, column order, combination rule (how chunk, tensor, group and rank partials
combine: a sum, a maximum or a count) and the optimizer families that define it are read here
from the extension, never typed a second time in Python. Aggregation (`core.stats`), the
recorder's columns, the store and the report all go through these tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch  # noqa: F401  (loads libtorch, which the op library links against)

from .. import _C

Combine = Literal["sum", "max", "count"]


@dataclass(frozen=True)
class StatSpec:
    """One entry of a statistics table."""

    name: str
    combine: Combine
    families: tuple[str, ...]  # the optimizer families whose kernels compute it
    definition: str  # what the value is, in words

    @property
    def is_max(self) -> bool:
        return self.combine == "max"


def _read(rows) -> tuple[StatSpec, ...]:
    return tuple(StatSpec(name, combine, tuple(families), definition) for name, combine, families, definition in rows)


#: The per-tensor statistics of one step, in the kernels' column order.
STEP_STATS: tuple[StatSpec, ...] = _read(_C.STAT_TABLE)
#: The per-tensor sums of the epoch geometry (`end_epoch`), in the op's column order.
EPOCH_STATS: tuple[StatSpec, ...] = _read(_C.EPOCH_STAT_TABLE)
#: The optimizer families, one kernel rule each.
FAMILIES: tuple[str, ...] = tuple(_C.FAMILIES)

STAT_NAMES: tuple[str, ...] = tuple(s.name for s in STEP_STATS)
STAT_INDEX: dict[str, int] = {name: i for i, name in enumerate(STAT_NAMES)}
NUM_STATS = len(STAT_NAMES)
EPOCH_COLUMNS: tuple[str, ...] = tuple(s.name for s in EPOCH_STATS)


def stats_of_family(family: str) -> tuple[StatSpec, ...]:
    """The step statistics a family's kernel computes."""
    if family not in FAMILIES:
        raise ValueError(f"unknown optimizer family {family!r}; known: {', '.join(FAMILIES)}")
    return tuple(s for s in STEP_STATS if family in s.families)


__all__ = [
    "StatSpec", "STEP_STATS", "EPOCH_STATS", "FAMILIES", "STAT_NAMES", "STAT_INDEX", "NUM_STATS",
    "EPOCH_COLUMNS", "stats_of_family",
]
