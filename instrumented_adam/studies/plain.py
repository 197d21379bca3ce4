"""Branches that switch to an optimizer without instrumentation (torch.optim.SGD, RMSprop).

Such an optimizer has no statistics kernel, so the `Recorder` (which reads them) cannot record
it. `PlainRecorder` records what there is — per epoch: the step count, the lr and weight decay in
force and the task's metrics; no step rows, no figures (NaN) — with the same lineage, lease,
checkpoint and resume rules, so that these branches sit in the tree and the comparison next to
the Adam ones, and a killed one is retried from its checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import torch

from ..telemetry.checkpoint import atomic_save, rng_state, set_rng_state
from ..telemetry.store import RunStore

#: Format marker of a plain branch's checkpoint (loaded weights-only).
PLAIN_FORMAT = "instrumented_adam.studies.plain-checkpoint"


class PlainRecorder:
    """Epoch rows and checkpoints of a run trained with a torch.optim optimizer (see module)."""

    def __init__(self, optimizer: torch.optim.Optimizer, store: str | Path, run_name: str, *, model: torch.nn.Module,
                 hyperparameters: Mapping[str, Any], seed: int | None, parent_run: int, branch_epoch: int,
                 branch_step: int, _resume: Mapping[str, Any] | None = None) -> None:
        self.optimizer = optimizer
        self.model = model
        self.store = RunStore(store, create=True)
        names = [k for k, v in optimizer.param_groups[0].items() if k != "params" and isinstance(v, (int, float))
                 and not isinstance(v, bool)]
        self._hyper_names = names
        try:
            if _resume is None:
                config = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
                self.run_id = self.store.create_run(
                    run_name, hyperparameters=hyperparameters, seed=seed, optimizer=type(optimizer).__name__,
                    optimizer_config=config, parent_run=parent_run, branch_epoch=branch_epoch, branch_step=branch_step,
                    num_groups=len(optimizer.param_groups), hyperparameter_columns=names)
                self.epoch, self.step = int(branch_epoch), int(branch_step)
            else:
                self.run_id = int(_resume["run_id"])
                self.store.acquire_lease(self.run_id, takeover=True)  # its previous writer died
                self.epoch, self.step = int(_resume["epoch"]), int(_resume["step"])
                self.store.truncate_run(self.run_id, step=self.step, epoch=self.epoch)
        except BaseException:
            self.store.close()
            raise
        self._epoch_start = self.step
        self._handle = optimizer.register_step_post_hook(self._count)

    def _count(self, *args: Any) -> None:
        self.step += 1

    @classmethod
    def resume(cls, checkpoint: str | Path, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
               store: str | Path) -> "PlainRecorder":
        """Continues the run a `save_checkpoint` file belongs to (model, optimizer, RNG restored)."""
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if ckpt.get("format") != PLAIN_FORMAT:
            raise ValueError(f"{checkpoint} is not a plain branch's checkpoint")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        return cls(optimizer, store, "", model=model, hyperparameters={}, seed=None, parent_run=0, branch_epoch=0,
                   branch_step=0, _resume=ckpt["position"])

    @torch.no_grad()
    def end_epoch(self, **metrics: float) -> dict[str, float]:
        group = self.optimizer.param_groups[0]
        row = {"epoch": self.epoch, "step": self.step, "num_steps": self.step - self._epoch_start, "recorded_steps": 0,
               "wall_time": time.time(), **{k: float(group[k]) for k in self._hyper_names}}
        self.store.write_epoch(self.run_id, row, metrics={k: float(v) for k, v in metrics.items()},
                               hyperparameters=self._hyper_names)
        self.epoch += 1
        self._epoch_start = self.step
        return {**{k: float(v) for k, v in row.items()}, **{k: float(v) for k, v in metrics.items()}}

    def save_checkpoint(self, path: str | Path, model: torch.nn.Module | None = None) -> Path:
        self.store.sync()
        payload = {"format": PLAIN_FORMAT, "model": (model or self.model).state_dict(),
                   "optimizer": self.optimizer.state_dict(), "rng": rng_state(),
                   "position": {"run_id": self.run_id, "epoch": self.epoch, "step": self.step}}
        path = atomic_save(payload, path)
        self.store.record_checkpoint(self.run_id, self.step, self.epoch, path)
        return path

    def close(self, status: str = "finished") -> None:
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        try:
            self.store.set_status(self.run_id, status)
            self.store.release_lease(self.run_id)
        finally:
            self.store.close()


__all__ = ["PlainRecorder", "PLAIN_FORMAT"]
