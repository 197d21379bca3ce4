"""The Lightning callback: a recorded run with Lightning's metrics, and a training interrupted
mid-epoch and resumed with Lightning's own `ckpt_path` whose store equals an uninterrupted one."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

lightning = pytest.importorskip("lightning")

import instrumented_adam as ia  # noqa: E402
from instrumented_adam.telemetry.lightning import CHECKPOINT_KEY, RecorderCallback  # noqa: E402
from instrumented_adam.telemetry.store import RunStore  # noqa: E402

EPOCHS = 4


class Tiny(lightning.LightningModule):
    def __init__(self, crash_at: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.crash_at = crash_at

    def training_step(self, batch, batch_idx):
        if self.crash_at == (self.current_epoch, batch_idx):
            raise RuntimeError("the job was killed")
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return ia.AdamW(self.parameters(), lr=1e-2)


def _loader(seed: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 3, generator=g)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(48, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


def _trainer(root: Path, callback: RecorderCallback, max_epochs: int = EPOCHS) -> "lightning.Trainer":
    checkpoints = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_epochs=1)
    return lightning.Trainer(max_epochs=max_epochs, callbacks=[callback, checkpoints], accelerator="cpu", devices=1,
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, default_root_dir=root)


def _fit(root: Path, crash_at=None, ckpt_path=None) -> None:
    torch.manual_seed(0)
    model = Tiny(crash_at)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging intervals
        _trainer(root, RecorderCallback(root / "runs.sqlite", "lightning", flush_every=4)).fit(
            model, _loader(1), _loader(2), ckpt_path=ckpt_path)


def _tables(path: Path):
    with RunStore(path) as store:
        runs = store.runs()
        drop = ["wall_time"]
        return (runs, store.steps().drop(columns=drop, errors="ignore"),
                store.epochs().drop(columns=drop, errors="ignore"))


def test_a_recorded_lightning_run_has_the_logged_metrics(tmp_path):
    _fit(tmp_path)
    runs, steps, epochs = _tables(tmp_path / "runs.sqlite")
    assert list(runs["status"]) == ["finished"] and list(runs["optimizer"]) == ["AdamW"]
    assert len(epochs) == EPOCHS and len(steps) == EPOCHS * 6
    assert epochs["val_loss"].notna().all() and epochs["train_loss"].notna().all()
    assert epochs["val_loss"].iloc[-1] < epochs["val_loss"].iloc[0]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last[CHECKPOINT_KEY]["epoch"] == EPOCHS


def test_interrupted_and_resumed_with_lightning_equals_an_uninterrupted_run(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _fit(whole)
    # Interrupted in epoch 2 after three of its six steps (their rows are flushed: flush_every=4).
    with pytest.raises(RuntimeError, match="killed"):
        _fit(broken, crash_at=(2, 3))
    runs, _, epochs = _tables(broken / "runs.sqlite")
    assert list(runs["status"]) == ["failed"] and len(epochs) == 2
    _fit(broken, ckpt_path=broken / "ckpt" / "last.ckpt")
    a, b = _tables(whole / "runs.sqlite"), _tables(broken / "runs.sqlite")
    assert list(b[0]["status"]) == ["finished"] and len(b[0]) == 1
    for x, y in zip(a[1:], b[1:]):
        assert x.shape == y.shape
        assert x.reset_index(drop=True).equals(y.reset_index(drop=True))
