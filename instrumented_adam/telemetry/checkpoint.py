"""Training checkpoints: one file with model, optimizer, recorder position and RNG states.

A checkpoint is written to a temporary file in the same directory, flushed to disk and moved
over the target with ``os.replace``: a crash while saving leaves the previous checkpoint intact,
never a truncated one. Everything in it is a tensor or a plain container of numbers and strings,
so it loads with ``torch.load(weights_only=True)``: opening a checkpoint never runs pickled code.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

#: Marker and version of the checkpoint layout written by `save_checkpoint`.
CHECKPOINT_FORMAT = "instrumented_adam.checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used as asked (not ours, or for another model or optimizer)."""


# ---- RNG states -------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The RNG states of torch (CPU and every initialised CUDA device), numpy's global RNG and
    Python's `random`, as tensors and plain containers (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, mt, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(mt), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) > torch.cuda.device_count():
            raise CheckpointError(
                f"the checkpoint holds RNG states of {len(cuda_states)} CUDA devices, this machine has {torch.cuda.device_count()}"
            )
        for i, s in enumerate(cuda_states):
            torch.cuda.set_rng_state(s, i)


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA), numpy's global RNG and Python's `random`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- model identity ---------------------------------------------------------------------------
def model_fingerprint(model: torch.nn.Module) -> list[list[Any]]:
    """[name, shape, dtype] of every entry of the model's state_dict, in order."""
    return [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items() if torch.is_tensor(v)]


def check_model(saved: list[list[Any]], model: torch.nn.Module) -> None:
    """Raises CheckpointError, naming the first differences, when `model` is not the saved one."""
    current = model_fingerprint(model)
    if [tuple(map(str, e)) for e in saved] == [tuple(map(str, e)) for e in current]:
        return
    saved_map = {e[0]: (e[1], e[2]) for e in saved}
    current_map = {e[0]: (e[1], e[2]) for e in current}
    problems = []
    for k in saved_map.keys() - current_map.keys():
        problems.append(f"'{k}' is in the checkpoint, not in the model")
    for k in current_map.keys() - saved_map.keys():
        problems.append(f"'{k}' is in the model, not in the checkpoint")
    for k in saved_map.keys() & current_map.keys():
        if saved_map[k] != current_map[k]:
            problems.append(f"'{k}': checkpoint has shape {saved_map[k][0]} {saved_map[k][1]}, model {current_map[k][0]} {current_map[k][1]}")
    if not problems:
        problems.append("the parameters are in a different order")
    shown = "; ".join(sorted(problems)[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    raise CheckpointError(f"the checkpoint is of another model: {shown}")


# ---- files ------------------------------------------------------------------------------------
def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file beside `path`, fsync, then os.replace onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some filesystems cannot fsync a directory; the file itself is complete
        pass
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Loads and validates a checkpoint written by `Recorder.save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"{path} is not an instrumented_adam checkpoint: cannot load it ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an instrumented_adam checkpoint (no '{CHECKPOINT_FORMAT}' marker); "
            "a plain model or optimizer state_dict loads with model.load_state_dict / optimizer.load_state_dict"
        )
    if obj.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {obj['version']}, newer than {CHECKPOINT_VERSION}: upgrade instrumented_adam")
    return obj


__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "rng_state",
    "set_rng_state",
    "seed_everything",
    "model_fingerprint",
    "check_model",
    "atomic_save",
    "load_checkpoint",
]
