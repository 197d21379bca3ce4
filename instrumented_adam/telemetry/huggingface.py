"""A Hugging Face `TrainerCallback` that records the Trainer's instrumented optimizer (``pip install .[hf]``).

    from instrumented_adam.telemetry.huggingface import RecorderCallback
    trainer = transformers.Trainer(model, args, optimizers=(ia.AdamW(model.parameters()), None),
                                   callbacks=[RecorderCallback("runs.sqlite", "my-run")], ...)

The Trainer hands callbacks Accelerate's wrapper of the optimizer; the recorder unwraps it. A
recorded "epoch" ends at each evaluation when the Trainer evaluates (``eval_strategy`` "epoch" or
"steps": step-based trainings get an epoch per evaluation interval), else at each Trainer epoch.
Its metrics are the evaluation's (``eval_loss`` is recorded as ``val_loss``, other ``eval_<x>`` as
``val_<x>``) and the last logged training loss (``train_loss``). At every Trainer checkpoint the
recorder's position is written into the checkpoint folder (`POSITION_FILE`), so
``trainer.train(resume_from_checkpoint=...)`` continues the *same* run and the store holds exactly
the rows of an uninterrupted training. Importing this module imports transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import TrainerCallback

from .recorder import Recorder
from .store import RunStore

#: The file, in a Trainer checkpoint folder, that holds the recorder's position.
POSITION_FILE = "instrumented_adam_recorder.pt"


def _strategy(args: Any) -> str:
    value = getattr(args, "eval_strategy", None) or getattr(args, "evaluation_strategy", "no")
    return str(getattr(value, "value", value))


def epoch_metrics(eval_metrics: Mapping[str, Any] | None, log_history: list[Mapping[str, Any]]) -> dict[str, float]:
    """The metrics of a recorded epoch: evaluation metrics renamed (eval_loss -> val_loss) and
    the latest logged training loss; runtime and throughput entries left out."""
    out: dict[str, float] = {}
    for name, value in (eval_metrics or {}).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or name == "epoch":
            continue
        if name.endswith(("_runtime", "_per_second")):
            continue
        out["val_" + name[len("eval_"):] if name.startswith("eval_") else name] = float(value)
    for entry in reversed(log_history):
        if "loss" in entry and isinstance(entry["loss"], (int, float)):
            out["train_loss"] = float(entry["loss"])
            break
    return out


class RecorderCallback(TrainerCallback):
    """Records a Hugging Face Trainer's instrumented optimizer into a run store.

    Args:
        store: the run store (path or `RunStore`).
        run_name: the run's name (a resumed training keeps the name it had).
        recorder_options: further `Recorder` arguments (``step_every``, ``flush_every``,
            ``hyperparameters``, ``seed``, ``ranks``, ...).
    """

    def __init__(self, store: RunStore | str | Path, run_name: str | None = None, **recorder_options: Any) -> None:
        self.store = store
        self.run_name = run_name
        self.recorder_options = recorder_options
        self.recorder: Recorder | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw: Any):
        if optimizer is None:
            raise ValueError("RecorderCallback: the Trainer passed no optimizer to its callbacks")
        position_file = Path(args.output_dir) / f"checkpoint-{state.global_step}" / POSITION_FILE
        if state.global_step > 0 and position_file.exists():  # resumed: the Trainer restored the states
            position = torch.load(position_file, map_location="cpu", weights_only=True)
            rank_keys = ("ranks", "check_ranks", "rank_rtol", "on_rank_mismatch", "tensorboard")
            options = {k: v for k, v in self.recorder_options.items() if k in rank_keys}
            self.recorder = Recorder.from_position(position, optimizer, model, self.store,
                                                   checkpoint=position_file.parent, **options)
        else:
            self.recorder = Recorder(optimizer, self.store, self.run_name, model=model, **self.recorder_options)

    def _end_epoch(self, state: Any, metrics: Mapping[str, Any] | None) -> None:
        rec = self.recorder
        if rec is None:
            return
        if rec.steps_this_epoch == 0:
            return  # no step since the last recorded epoch
        rec.end_epoch(**epoch_metrics(metrics, state.log_history))

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Mapping[str, Any] | None = None, **kw: Any):
        if _strategy(args) != "no":
            self._end_epoch(state, metrics)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any):
        if _strategy(args) == "no":
            self._end_epoch(state, None)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any):
        # Called right after the Trainer wrote checkpoint-<global_step>: the position goes with it.
        if self.recorder is None:
            return
        position = self.recorder.checkpoint_position()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if position is not None and folder.is_dir():
            tmp = folder / (POSITION_FILE + ".tmp")
            torch.save(position, tmp)
            tmp.replace(folder / POSITION_FILE)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any):
        if self.recorder is not None:
            self.recorder.close("finished")
            self.recorder = None


__all__ = ["RecorderCallback", "POSITION_FILE", "epoch_metrics"]
