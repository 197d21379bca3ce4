"""instrumented_adam: Adam, AdamW, Adamax, SGD, RMSprop and Adagrad whose fused kernels measure
what the optimizer does.

    import instrumented_adam as ia
    opt = ia.Adam(model.parameters(), lr=1e-3)          # drop-in for torch.optim.Adam
    ...
    opt.step()
    opt.last_step_statistics().derived()               # norms, cosines, effective lr, ...
    opt.end_epoch().derived()                          # epoch step norm, angle, distance

The package's folders are its layers, each importing only the ones below it:

    core/        the compiled ops, the statistics table, optimizers, functional API, reference
    telemetry/   per-step capture, the run store, checkpoints, resume and branching, export
    analysis/    relations between figures and losses, plots, the HTML report
    demo/        built-in tasks and the command line

Names are imported lazily: `import instrumented_adam.telemetry.store` (or reading a report)
never loads torch's kernels or the compiled op library.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# public name -> the module that defines it
_LAZY = {
    "Adam": "core.optimizer",
    "AdamW": "core.optimizer",
    "Adamax": "core.optimizer",
    "state_nbytes": "core.optimizer",
    "SGD": "core.classic",
    "RMSprop": "core.classic",
    "Adagrad": "core.classic",
    "Algorithm": "core._ops",
    "STAT_NAMES": "core._ops",
    "STAT_INDEX": "core._ops",
    "NUM_STATS": "core._ops",
    "EPOCH_COLUMNS": "core.stats",
    "StepStatistics": "core.stats",
    "EpochGeometry": "core.stats",
    "Recorder": "telemetry.recorder",
    "RunStore": "telemetry.store",
}

# public module name -> the module: `ia.functional.adam(...)`
_LAZY_MODULES = {"functional": "core.functional", "classic_functional": "core.classic_functional"}

__all__ = [*_LAZY, *_LAZY_MODULES, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        value = importlib.import_module(f".{_LAZY_MODULES[name]}", __name__)
    elif name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'instrumented_adam' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_MODULES))
