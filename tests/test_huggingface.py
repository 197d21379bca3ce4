"""The Hugging Face Trainer callback: a tiny model built in code (no downloads) trained by the
Trainer with our AdamW; a training interrupted mid-epoch and resumed with
`resume_from_checkpoint` records exactly the rows of an uninterrupted one."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import instrumented_adam as ia  # noqa: E402
from instrumented_adam.telemetry.huggingface import POSITION_FILE, RecorderCallback, epoch_metrics  # noqa: E402
from instrumented_adam.telemetry.store import RunStore  # noqa: E402

EPOCHS = 3


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.crash_at_call: int | None = None
        self.calls = 0

    def forward(self, x, labels=None):
        if self.training:
            self.calls += 1
            if self.calls == self.crash_at_call:
                raise RuntimeError("the job was killed")
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(40, 3, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _train(root: Path, crash_at_call: int | None = None, resume: Path | None = None) -> RecorderCallback:
    torch.manual_seed(0)
    model = Tiny()
    model.crash_at_call = crash_at_call
    args = transformers.TrainingArguments(
        output_dir=str(root / "out"), num_train_epochs=EPOCHS, per_device_train_batch_size=8,
        eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch", report_to=[], use_cpu=True,
        seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    callback = RecorderCallback(root / "runs.sqlite", "hf", flush_every=3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(1), eval_dataset=Rows(2),
                                   optimizers=(ia.AdamW(model.parameters(), lr=1e-2), None), callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return callback


def _tables(path: Path):
    with RunStore(path) as store:
        return (store.runs(), store.steps().drop(columns=["wall_time"], errors="ignore"), store.epochs().drop(columns=["wall_time"], errors="ignore"))


def test_epoch_metrics_rename_and_filter():
    got = epoch_metrics({"eval_loss": 0.5, "eval_runtime": 1.0, "eval_samples_per_second": 9.0, "epoch": 1.0},
                        [{"loss": 0.7, "epoch": 1.0}, {"eval_loss": 0.5}])
    assert got == {"val_loss": 0.5, "train_loss": 0.7}


def test_hf_trainer_records_and_resumes_exactly(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _train(whole)
    runs, steps, epochs = _tables(whole / "runs.sqlite")
    assert list(runs["status"]) == ["finished"] and list(runs["optimizer"]) == ["AdamW"]
    assert len(epochs) == EPOCHS and len(steps) == EPOCHS * 5
    assert epochs["val_loss"].notna().all() and epochs["train_loss"].notna().all()
    # Killed in the third epoch (training forward 13 of 15): the Trainer's checkpoint of epoch 2 stands.
    callback = None
    with pytest.raises(RuntimeError, match="killed"):
        _train(broken, crash_at_call=13)
    checkpoint = broken / "out" / "checkpoint-10"
    assert (checkpoint / POSITION_FILE).exists()
    # A killed process's lease is free; here the process lives on, so its recorder is closed as a
    # job script's cleanup would (`Recorder.close("failed")`).
    from instrumented_adam.telemetry.recorder import _ATTACHED

    for ref in list(_ATTACHED.values()):
        rec = ref()
        if rec is not None and not rec._closed and str(rec.store.path).startswith(str(broken)):
            rec.close("failed")
    callback = _train(broken, resume=checkpoint)
    assert callback.recorder is None  # closed at the end of training
    a, b = _tables(whole / "runs.sqlite"), _tables(broken / "runs.sqlite")
    assert list(b[0]["status"]) == ["finished"] and len(b[0]) == 1
    for x, y in zip(a[1:], b[1:]):
        assert x.reset_index(drop=True).equals(y.reset_index(drop=True))
