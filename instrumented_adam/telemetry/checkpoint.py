"""Training checkpoints: one file with model, optimizer, recorder position and RNG states.

A checkpoint is written to a temporary file in the same directory, flushed to disk and moved
over the target with ``os.replace``: a crash while saving leaves the previous checkpoint intact,
never a truncated one, and the next save removes the temporary files such a crash left behind.
Everything in it is a tensor or a plain container of numbers and strings, so it loads with
``torch.load(weights_only=True)``: opening a checkpoint never runs pickled code. A value that
such a load could not read back (a numpy scalar, a Path, an argparse Namespace, a datetime) is
refused when saving, naming its key, rather than when resuming weeks later.

Since version 2 a checkpoint carries a sha256 of its payload (every tensor's bytes, dtype and
shape, and every other value, in order), verified on load: a flipped byte in tensor data is an
error naming the file, not a silently different model.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import io
import os
import random
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

#: Marker and version of the checkpoint layout written by `save_checkpoint`.
CHECKPOINT_FORMAT = "instrumented_adam.checkpoint"
CHECKPOINT_VERSION = 2
#: How `payload_checksum` hashes (stored beside the digest, so that it can change later).
CHECKSUM_ALGORITHM = "sha256-payload-v1"


class CheckpointError(ValueError):
    """A checkpoint cannot be used as asked (not ours, corrupt, or for another model or optimizer)."""


class CheckpointSpaceError(OSError):
    """No space left on the device while saving a checkpoint (errno ENOSPC or EDQUOT); the
    previous checkpoint at the target path is intact and the partial file is removed."""


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


# ---- payload checks ---------------------------------------------------------------------------
# Exact types that torch.load(weights_only=True) reads back; anything else is tried once.
_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _key(path: str, key: Any) -> str:
    return f"{path}[{key!r}]"


def _walk(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(key path, leaf) of a payload, in a fixed order (dicts in insertion order)."""
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            yield f"{path} key {k!r}", k
            yield from _walk(v, _key(path, k))
    elif type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            yield from _walk(v, _key(path, i))
    else:
        yield path, obj


def _readable_with_weights_only(value: Any) -> bool:
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means: it would not come back
        return False
    return True


def check_weights_only(payload: Mapping[str, Any], root: str = "checkpoint") -> None:
    """Raises CheckpointError naming the first value of `payload` that
    ``torch.load(weights_only=True)`` could not read back (numpy scalars and arrays, Path,
    argparse.Namespace, datetime, arbitrary objects), with what to store instead."""
    for path, leaf in _walk(payload, root):
        if torch.is_tensor(leaf) and type(leaf) in (torch.Tensor, torch.nn.Parameter):
            continue
        if type(leaf) in _PLAIN_LEAVES or _readable_with_weights_only(leaf):
            continue
        kind = f"{type(leaf).__module__}.{type(leaf).__qualname__}"
        raise CheckpointError(
            f"{path} is a {kind}, which torch.load(weights_only=True) cannot read back at resume: store a "
            "tensor (torch.as_tensor), a number (.item()), a string (str(...)) or a dict of those instead"
        )


def payload_checksum(payload: Mapping[str, Any]) -> str:
    """sha256 over a payload: each tensor's dtype, shape and bytes and each other value's type
    and repr, in order, with the key paths (the 'checksum' entry itself left out)."""
    digest = hashlib.sha256()
    for path, leaf in _walk({k: v for k, v in payload.items() if k != "checksum"}, ""):
        digest.update(path.encode())
        if torch.is_tensor(leaf):
            t = leaf.detach()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                data = t.cpu().contiguous().reshape(-1).view(torch.uint8)
                digest.update(data.numpy())
        elif isinstance(leaf, (set, frozenset)):  # iteration order of str sets differs per process
            digest.update(f"{type(leaf).__name__}:{sorted(map(repr, leaf))!r}".encode())
        else:
            digest.update(f"{type(leaf).__name__}:{leaf!r}".encode())
    return digest.hexdigest()


# ---- files ------------------------------------------------------------------------------------
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_TEMP = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})\.ia-tmp$")


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{os.urandom(4).hex()}.ia-tmp")


def _process_is_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def clean_stale_temporaries(directory: str | Path) -> list[Path]:
    """Removes the temporary files that interrupted saves left in `directory`: only ours (by
    name), only from this host, only of processes that no longer run. Returns what was removed."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or m["host"] != _HOST or not _process_is_gone(int(m["pid"])):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def _no_space(error: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind `error`, if any (torch wraps it in an 'enforce fail')."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def _open_for_writing(path: Path) -> Any:
    """The file object a save writes to (one place, so that tests can simulate a full disk)."""
    return open(path, "xb")


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file beside `path`, fsync, then os.replace onto `path`.

    A checkpoint payload (a dict with our format marker) is first checked for values that a
    weights-only load cannot read back (CheckpointError naming the key) and gets its checksum.
    Temporary files left by interrupted saves in the directory are removed first.

    Raises:
        CheckpointSpaceError: the device is full (the previous file at `path` is intact).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        check_weights_only({k: v for k, v in obj.items() if k != "checksum"})
        obj = {**{k: v for k, v in obj.items() if k != "checksum"}, "checksum": None}
        obj["checksum"] = {"algorithm": CHECKSUM_ALGORITHM, "digest": payload_checksum(obj)}
    clean_stale_temporaries(path.parent)
    tmp = _temp_path(path)
    try:
        with _open_for_writing(tmp) as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        full = _no_space(e)
        if full is not None:
            free = shutil.disk_usage(path.parent).free
            raise CheckpointSpaceError(
                full.errno,
                f"no space left on the device while saving the checkpoint {path} ({free} bytes free in "
                f"{path.parent}): free space or save elsewhere; the previous checkpoint there, if any, is intact",
                str(path),
            ) from e
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
    """Loads and validates a checkpoint written by `Recorder.save_checkpoint`.

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: not ours, from a newer version, or corrupt (its checksum does not match
            its contents: the message names the file).
    """
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
    version = obj.get("version", 0)
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {version}, newer than {CHECKPOINT_VERSION}: upgrade instrumented_adam")
    checksum = obj.get("checksum")
    if version >= 2 or checksum is not None:
        if not isinstance(checksum, dict) or checksum.get("algorithm") != CHECKSUM_ALGORITHM:
            raise CheckpointError(f"{path} is corrupt or incomplete: it has no valid checksum ({checksum!r})")
        actual = payload_checksum(obj)
        if actual != checksum.get("digest"):
            raise CheckpointError(
                f"{path} is corrupt: its contents do not match the checksum stored when it was written "
                f"(sha256 {checksum.get('digest')}, now {actual}); the file was damaged after saving: resume "
                "from an earlier checkpoint"
            )
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
    "CheckpointSpaceError",
    "check_weights_only",
    "payload_checksum",
    "clean_stale_temporaries",
]
