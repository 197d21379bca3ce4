"""instrumented_adam: Adam, AdamW and Adamax whose fused kernels measure what the optimizer does.

    import instrumented_adam as ia
    opt = ia.Adam(model.parameters(), lr=1e-3)          # drop-in for torch.optim.Adam
    ...
    opt.step()
    opt.last_step_statistics().derived()               # norms, cosines, effective lr, ...
    opt.end_epoch().derived()                          # epoch step norm, angle, distance
"""

import torch  # noqa: F401  (loads libtorch before our op library)

from ._ops import NUM_STATS, STAT_INDEX, STAT_NAMES, Algorithm
from .optimizer import Adam, Adamax, AdamW
from .stats import EPOCH_COLUMNS, EpochGeometry, StepStatistics

__all__ = [
    "Adam",
    "AdamW",
    "Adamax",
    "Algorithm",
    "STAT_NAMES",
    "STAT_INDEX",
    "NUM_STATS",
    "EPOCH_COLUMNS",
    "StepStatistics",
    "EpochGeometry",
]
__version__ = "0.1.0"
