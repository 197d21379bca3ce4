"""The training protocol: what a user implements once so that their training can be branched.

A study re-trains a model from an intermediate checkpoint with other optimizer settings. For a
branch with no overrides to continue its parent *bitwise*, everything a training does between two
checkpoints must be a function of what the checkpoint holds plus the run's seed and the epoch
number. The protocol makes that explicit: the study owns the loop (optimizer, recorder,
checkpoints, lr schedule), the task owns the model, the data and one epoch of training.

    class MyTask(TrainingTask):
        name = "my-task"
        def model(self, seed):            # a fresh model (a branch then loads the checkpoint's weights)
            torch.manual_seed(seed); return MyNet()
        def train_epoch(self, model, optimizer, epoch, seed):
            g = torch.Generator().manual_seed(epoch_seed(seed, epoch))  # data order from (seed, epoch)
            for x, y in batches(self.train_set, generator=g):
                optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
        def evaluate(self, model):        # full-set losses at the epoch's end
            return {"train_loss": ..., "val_loss": ...}

    def make_task(**kwargs): return MyTask(**kwargs)   # --task mypackage.mymodule:make_task

`load_task("mypackage.mymodule:make_task", {...})` builds one from a reference, which is what
worker processes and Ray workers do (a reference travels; a task object need not pickle).
"""

from __future__ import annotations

import hashlib
import importlib
from abc import ABC, abstractmethod
from typing import Any, Mapping

import torch
from torch import nn

#: The optimizer a root run of a study uses unless told otherwise.
DEFAULT_OPTIMIZER = "Adam"


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for epoch `epoch` of a run seeded `seed` (data order, dropout, augmentation).

    Derived by hashing, so that neighbouring seeds and epochs give unrelated streams and a
    continuation from epoch k draws exactly what the uninterrupted run drew.
    """
    digest = hashlib.sha256(f"instrumented_adam.epoch_seed:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class TrainingTask(ABC):
    """A user's training, in the pieces a study needs (see the module docstring).

    Implement `model`, `train_epoch` and `evaluate`; `hyperparameters` and `default_optimizer`
    are optional. `train_epoch` must take its randomness from ``epoch_seed(seed, epoch)`` (or
    another function of the two), not from a generator carried across epochs: a branch or a
    resumed run starts at an epoch boundary with nothing else in hand.
    """

    #: A short name, stored with the runs.
    name: str = "task"

    @abstractmethod
    def model(self, seed: int) -> nn.Module:
        """A freshly initialised model for a run seeded `seed` (a branch overwrites its weights)."""

    @abstractmethod
    def train_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, seed: int) -> Mapping[str, float] | None:
        """Trains one epoch (``optimizer.step()`` per batch); may return extra epoch metrics."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> Mapping[str, float]:
        """Metrics at the current parameters; ``val_loss`` (and ``train_loss``) are compared."""

    def default_optimizer(self) -> Mapping[str, Any]:
        """The root run's optimizer: ``{"optimizer": "Adam", "lr": ..., ...}`` (constructor arguments)."""
        return {"optimizer": DEFAULT_OPTIMIZER}

    def hyperparameters(self) -> Mapping[str, Any]:
        """Facts about the task stored with its runs (sizes, data set, architecture)."""
        return {}


def load_task(ref: str, kwargs: Mapping[str, Any] | None = None) -> TrainingTask:
    """The task a reference names: ``"package.module:factory"`` called with `kwargs`.

    The factory may be a `TrainingTask` subclass or a function returning an instance.
    """
    if not isinstance(ref, str) or ":" not in ref:
        raise ValueError(f"a task reference is 'package.module:factory', got {ref!r}")
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import the task module {module_name!r} of {ref!r}: {e}") from e
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ValueError(f"{module_name!r} has no {attr!r} (task reference {ref!r})")
    task = factory(**dict(kwargs or {}))
    if not isinstance(task, TrainingTask):
        raise TypeError(f"{ref} returned a {type(task).__name__}, not a TrainingTask")
    return task


__all__ = ["TrainingTask", "load_task", "epoch_seed", "DEFAULT_OPTIMIZER"]
