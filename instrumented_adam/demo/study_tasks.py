"""The built-in demo tasks (linreg, digits) in the study's training protocol.

    --task instrumented_adam.demo.study_tasks:make_task --task-arg name=digits

Data come from the task's fixed `data_seed` (the same split for every run and branch); the
model's initialisation from the run's seed; each epoch's batch order from ``epoch_seed(seed,
epoch)``, so that a branch at any epoch sees the batches its parent saw.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..studies.protocol import TrainingTask, epoch_seed
from .tasks import TASKS, TrainConfig
from .tasks import Task as DemoTask

#: The reference of `make_task`, as the CLI and the sweeps pass it.
TASK_REF = "instrumented_adam.demo.study_tasks:make_task"


class DemoStudyTask(TrainingTask):
    """A demo task (`instrumented_adam.demo.tasks.TASKS`) as a `TrainingTask`.

    Args:
        name: "linreg" or "digits".
        batch_size: minibatch size (default: the task's).
        data_seed: the seed of the data set and its split.
        n_train: use only the first n_train training examples (tiny studies and tests).
    """

    def __init__(self, name: str = "linreg", *, batch_size: int | None = None, data_seed: int = 0,
                 n_train: int | None = None, activation: str = "tanh") -> None:
        if name not in ("linreg", "digits"):
            raise ValueError(f"unknown study task {name!r}; choose 'linreg' or 'digits'")
        self.demo: DemoTask = TASKS[name]
        self.name = name
        self.config = self.demo.resolve(TrainConfig(batch_size=batch_size, activation=activation))
        self.data_seed = int(data_seed)
        data = self.demo.data(self.data_seed)
        if n_train is not None:
            data = type(data)(data.x_train[:n_train], data.y_train[:n_train], data.x_val, data.y_val)
        self.data = data

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return self.demo.model(self.config, self.data)

    def default_optimizer(self) -> Mapping[str, Any]:
        return {"optimizer": "Adam", "lr": float(self.demo.default_lr["adam"])}

    def train_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, seed: int) -> Mapping[str, float]:
        data = self.data
        order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
        bs = int(self.config.batch_size)
        for lo in range(0, len(order), bs):
            idx = order[lo : lo + bs]
            loss = self.demo.loss(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return self.demo.epoch_metrics(model)

    def evaluate(self, model: nn.Module) -> Mapping[str, float]:
        return self.demo.evaluate(model, self.data)

    def hyperparameters(self) -> Mapping[str, Any]:
        return {"task_description": self.demo.description, "batch_size": int(self.config.batch_size),
                "data_seed": self.data_seed, "train_size": len(self.data.x_train)}


def make_task(name: str = "linreg", **kwargs: Any) -> DemoStudyTask:
    """A built-in task by name (the CLI's default task factory)."""
    return DemoStudyTask(name, **kwargs)


__all__ = ["DemoStudyTask", "make_task", "TASK_REF"]
