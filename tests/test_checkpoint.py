"""Checkpoint files (issue 10 item 3): verified on load, refused at save when a weights-only load
could not read them back, a clear error on a full disk, and no temporaries left behind.

Run as a script (`python test_checkpoint.py save-forever <path>`), it is a process killed in the
middle of a save.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import instrumented_adam as ia
from instrumented_adam.telemetry import checkpoint
from instrumented_adam.telemetry.checkpoint import (
    CheckpointError,
    CheckpointSpaceError,
    atomic_save,
    load_checkpoint,
)
from instrumented_adam.telemetry.recorder import Recorder


def _recorded(tmp_path: Path) -> tuple[Recorder, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = ia.Adam(model.parameters())
    rec = Recorder(opt, tmp_path / "c.sqlite", run_name="c", model=model)
    for _ in range(3):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    rec.end_epoch(val_loss=1.0)
    return rec, model


def _tensor_offset(path: Path, tensor: torch.Tensor) -> int:
    """Where the bytes of `tensor` lie in a saved file (found by content: torch stores them raw)."""
    data = path.read_bytes()
    raw = tensor.detach().contiguous().numpy().tobytes()
    offset = data.find(raw)  # (the optimizer's epoch snapshot may hold the same values later on)
    assert offset > 0
    return offset


def test_a_flipped_byte_in_tensor_data_is_caught_on_load(tmp_path):
    """Reproduction on the landed code: flipping one byte inside a weight's data, the checkpoint
    loaded silently and training resumed from a different model."""
    rec, model = _recorded(tmp_path)
    path = rec.save_checkpoint(tmp_path / "ok.pt", model)
    assert load_checkpoint(path)["checksum"]["algorithm"] == checkpoint.CHECKSUM_ALGORITHM
    offset = _tensor_offset(path, model[2].weight)
    damaged = bytearray(path.read_bytes())
    damaged[offset + 5] ^= 0x10
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(damaged))
    torch.load(bad, weights_only=True)  # what the landed code did: it loads, silently different
    with pytest.raises(CheckpointError, match=r"bad\.pt is corrupt: its contents do not match the checksum"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="corrupt"):
        Recorder.resume(bad, ia.Adam(model.parameters()), model, tmp_path / "c.sqlite")
    rec.close()


@pytest.mark.parametrize(
    "value, kind",
    [
        (np.float64(0.5), "numpy.float64"),
        (np.arange(3), "numpy.ndarray"),
        (Path("/data/set"), "pathlib"),
        (argparse.Namespace(lr=1e-3), "argparse.Namespace"),
        (datetime.datetime(2026, 1, 1), "datetime.datetime"),
    ],
)
def test_extra_values_a_weights_only_load_cannot_read_are_refused_at_save(tmp_path, value, kind):
    """Reproduction on the landed code: the save succeeded and the resume, weeks later, failed
    inside torch.load(weights_only=True) with 'Unsupported global'."""
    rec, model = _recorded(tmp_path)
    target = tmp_path / "e.pt"
    with pytest.raises(CheckpointError, match=rf"checkpoint\['extra'\]\['config'\]\['x'\] is a {kind}.*weights_only=True"):
        rec.save_checkpoint(target, model, extra={"config": {"x": value}, "fine": torch.ones(2)})
    assert not target.exists() and not list(tmp_path.glob(".*tmp"))
    rec.save_checkpoint(target, model, extra={"config": {"x": 0.5, "when": "2026-01-01", "ok": (1, "a")}, "s": {1, 2}})
    assert load_checkpoint(target)["extra"]["config"]["ok"] == (1, "a")
    rec.close()


class _FullDisk(io.BufferedWriter):
    """A file that raises ENOSPC once `room` bytes are written, like a full device."""

    room = 4096

    def write(self, data):  # type: ignore[override]
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_a_full_disk_gives_a_clear_no_space_error(tmp_path, monkeypatch):
    """Reproduction on the landed code: torch raised 'RuntimeError: [enforce fail at
    inline_container.cc] . unexpected pos ...'."""
    rec, model = _recorded(tmp_path)
    target = rec.save_checkpoint(tmp_path / "last.pt", model)
    good = target.read_bytes()
    monkeypatch.setattr(checkpoint, "_open_for_writing", lambda path: _FullDisk(open(path, "xb")))
    with pytest.raises(CheckpointSpaceError, match=r"no space left on the device while saving the checkpoint .*last\.pt") as info:
        rec.save_checkpoint(target, model)
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == good  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith("tmp")] == []
    rec.close()


def test_a_full_tmpfs_gives_the_same_error(tmp_path):
    """The same on a real full device: a 256 KiB tmpfs (needs mount rights, skipped otherwise)."""
    point = tmp_path / "small"
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(CheckpointSpaceError, match="no space left"):
            atomic_save({"format": checkpoint.CHECKPOINT_FORMAT, "version": 2, "w": torch.zeros(200_000)}, point / "big.pt")
        assert list(point.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _save_forever(path: str) -> None:
    """Starts a save whose write never ends (to be killed with SIGKILL in the middle)."""

    class _Slow(io.BufferedWriter):
        def write(self, data):  # type: ignore[override]
            n = super().write(data)
            self.flush()
            print("WRITING", flush=True)
            time.sleep(600)
            return n

    checkpoint._open_for_writing = lambda p: _Slow(open(p, "xb"))
    atomic_save({"format": checkpoint.CHECKPOINT_FORMAT, "version": 2, "w": torch.zeros(10_000)}, path)


def test_temporaries_of_an_interrupted_save_are_cleaned_by_the_next_save(tmp_path):
    """Reproduction on the landed code: a save killed mid-write left '.name.XXXX.tmp' files that
    no later save removed (one per kill, each as large as a checkpoint)."""
    env = dict(os.environ, PYTHONPATH=str(Path(ia.__file__).parent.parent))
    proc = subprocess.Popen([sys.executable, __file__, "save-forever", str(tmp_path / "epoch3.pt")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().startswith("WRITING")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".epoch3.pt.")]
    assert len(left) == 1
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_text("not ours")
    atomic_save({"format": checkpoint.CHECKPOINT_FORMAT, "version": 2, "w": torch.ones(3)}, tmp_path / "epoch4.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "epoch4.pt"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "save-forever":
    _save_forever(sys.argv[2])
