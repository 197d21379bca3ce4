"""A Lightning callback that records a training's instrumented optimizer (``pip install .[lightning]``).

    from instrumented_adam.telemetry.lightning import RecorderCallback
    trainer = lightning.Trainer(callbacks=[RecorderCallback("runs.sqlite", "my-run")])

Per step nothing is needed (the recorder hooks the optimizer's step); per epoch the callback ends
the recorder's epoch with the scalar metrics the module logged (``trainer.callback_metrics``:
``self.log("val_loss", ...)``). The recorder's position travels inside Lightning's own
checkpoints, so ``trainer.fit(model, ckpt_path=...)`` continues the *same* run, and the store
then holds exactly the rows of an uninterrupted training. Importing this module imports
Lightning; nothing else in the package does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package name
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]

from .recorder import Recorder
from .store import RunStore

#: The key of the recorder's position in a Lightning checkpoint.
CHECKPOINT_KEY = "instrumented_adam_recorder"


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite-or-not scalar entries of a metrics mapping (one-element tensors, numbers)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if torch.is_tensor(value):
            if value.numel() != 1:
                continue
            value = value.detach().item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(name)] = float(value)
    return out


class RecorderCallback(Callback):
    """Records the Lightning module's (single) instrumented optimizer into a run store.

    Args:
        store: the run store (path or `RunStore`).
        run_name: the run's name (a resumed training keeps the name it had).
        metrics: which logged metrics go with each epoch row: None (every scalar in
            ``trainer.callback_metrics``), a sequence of names, or a callable mapping the callback
            metrics to the ones to record.
        recorder_options: further `Recorder` arguments (``step_every``, ``flush_every``,
            ``hyperparameters``, ``seed``, ``ranks``, ``check_ranks``, ...).

    The epoch ends once per Lightning epoch: at ``on_train_epoch_end``, or earlier when Lightning
    saves a checkpoint after the epoch's last batch (its validation-end checkpoint), so that the
    checkpoint's position includes the whole epoch.
    """

    def __init__(
        self,
        store: RunStore | str | Path,
        run_name: str | None = None,
        *,
        metrics: Callable[[Mapping[str, Any]], Mapping[str, Any]] | list[str] | tuple[str, ...] | None = None,
        **recorder_options: Any,
    ) -> None:
        super().__init__()
        self.store = store
        self.run_name = run_name
        self.metrics = metrics
        self.recorder_options = recorder_options
        self.recorder: Recorder | None = None
        self._position: Mapping[str, Any] | None = None  # from a checkpoint being resumed
        self._epoch_ended: int | None = None  # the Lightning epoch whose recorder epoch has ended

    # ---- the run ----------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"RecorderCallback records one optimizer; this training has {len(optimizers)}")
        optimizer = optimizers[0]
        if self._position is not None:  # Lightning has restored the module and optimizer states
            rank_keys = ("ranks", "check_ranks", "rank_rtol", "on_rank_mismatch", "tensorboard")
            options = {k: v for k, v in self.recorder_options.items() if k in rank_keys}
            self.recorder = Recorder.from_position(self._position, optimizer, pl_module, self.store,
                                                   checkpoint=getattr(trainer, "ckpt_path", None), **options)
            self._position = None
        else:
            self.recorder = Recorder(optimizer, self.store, self.run_name, model=pl_module, **self.recorder_options)
        self._epoch_ended = None

    def _selected_metrics(self, trainer: Any) -> dict[str, float]:
        metrics = dict(trainer.callback_metrics)
        if callable(self.metrics):
            metrics = dict(self.metrics(metrics))
        elif self.metrics is not None:
            metrics = {k: metrics[k] for k in self.metrics if k in metrics}
        return scalar_metrics(metrics)

    def _end_epoch(self, trainer: Any) -> None:
        if self.recorder is None or self._epoch_ended == trainer.current_epoch:
            return
        self._epoch_ended = trainer.current_epoch
        if self.recorder.steps_this_epoch == 0:
            return  # no step this epoch (e.g. a resumed training whose epoch was already complete)
        self.recorder.end_epoch(**self._selected_metrics(trainer))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._end_epoch(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.recorder is not None:
            self.recorder.close("finished")
            self.recorder = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.recorder is not None:
            self.recorder.close("failed")
            self.recorder = None

    # ---- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self.recorder is None:
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if getattr(progress, "is_last_batch", False):
            # A checkpoint after the epoch's last batch (validation end): the epoch is over.
            self._end_epoch(trainer)
        checkpoint[CHECKPOINT_KEY] = self.recorder.checkpoint_position()

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        position = checkpoint.get(CHECKPOINT_KEY)
        if position is not None:
            self._position = position


__all__ = ["RecorderCallback", "CHECKPOINT_KEY", "scalar_metrics"]
