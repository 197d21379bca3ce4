"""Lineage: a run's checkpoints, its resume after a crash, and branches from its checkpoints.

What a checkpoint carries for the recorder (``payload["recorder"]``): the run's identity (id,
name, start time, store path), its position (step, epoch, epoch start, step offset), the epoch in
progress's running aggregates (O(1), whatever the epoch's length), staged metrics, the
hyperparameters last in force, and `RunStore.position` of the run taken right after a full
`RunStore.sync`: what the store durably held when the checkpoint was written.

`resume` takes the run's lease (a second live writer is refused, an expired one taken over only
with ``takeover=True``), checks that the store still holds what the checkpoint expects
(`RunStore.verify_position`: refused, or with ``on_gap="mark"`` the missing range is marked in
the store's gaps), restores model, optimizer and RNG states, and deletes the run's rows beyond the
checkpoint, so that the store holds exactly what an uninterrupted run writes. `branch` starts a
child run from a checkpoint, with its parent and branch epoch/step recorded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .ranks import unwrap_optimizer
from .checkpoint import CheckpointError, check_model, load_checkpoint, seed_everything, set_rng_state
from .store import RunStore, StoreGapError
from .writer import STEP_FIGURES, EpochAggregates

if TYPE_CHECKING:
    from .recorder import Recorder

#: What `resume` does when the store lacks rows the checkpoint expects.
ON_GAP = ("refuse", "mark")

# Hyperparameter order of checkpoints written before the columns were generic (version 1 rows).
_LEGACY_HYPER_NAMES = ("lr", "weight_decay", "beta1", "beta2", "eps")


def check_fits(ckpt: dict[str, Any], optimizer: torch.optim.Optimizer, model: torch.nn.Module | None, load_optimizer: bool) -> None:
    """Raises CheckpointError when the checkpoint's model or optimizer state does not fit; changes nothing."""
    if ckpt.get("model") is not None:
        if model is None:
            raise CheckpointError("the checkpoint holds a model state: pass the model to restore it")
        check_model(ckpt["model_fingerprint"], model)
    elif model is not None:
        raise CheckpointError("the checkpoint holds no model state (it was saved without a model)")
    check_state = getattr(optimizer, "_check_state_dict", None)  # our optimizers validate without loading
    if load_optimizer and callable(check_state):
        try:
            check_state(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"the checkpoint's optimizer state ({ckpt.get('optimizer_class')}) does not fit this "
                f"{type(optimizer).__name__}: {e}"
            ) from e


def load_into(ckpt: dict[str, Any], optimizer: torch.optim.Optimizer, model: torch.nn.Module | None, load_optimizer: bool) -> None:
    """Validates everything first, then loads: a mismatch leaves model and optimizer untouched."""
    check_fits(ckpt, optimizer, model, load_optimizer)
    if load_optimizer:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])  # validates before it changes anything
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"the checkpoint's optimizer state ({ckpt.get('optimizer_class')}) does not fit this "
                f"{type(optimizer).__name__}: {e}"
            ) from e
    if model is not None:
        model.load_state_dict(ckpt["model"])


def load_start(ckpt: dict[str, Any], optimizer: torch.optim.Optimizer, model: torch.nn.Module | None,
               load_optimizer: bool, overrides: Mapping[str, Any] | None, seed: int | None) -> None:
    """A branch's starting point: the checkpoint's states, the overrides on every param group,
    and the checkpoint's RNG states (or everything seeded with `seed`)."""
    load_into(ckpt, optimizer, model, load_optimizer=load_optimizer)
    for group in optimizer.param_groups:
        group.update(overrides or {})
    if seed is not None:
        seed_everything(seed)
    else:
        set_rng_state(ckpt["rng"])


def saved_hyper(position: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[tuple[Any, ...], ...]] | None:
    """(names, per-group values) of the hyperparameters last in force, from a checkpoint position."""
    last = position.get("last_hyper")
    if last is None:
        return None
    if isinstance(last, Mapping):
        return tuple(last["names"]), tuple(tuple(v) for v in last["values"])
    return _LEGACY_HYPER_NAMES, tuple(tuple(v) for v in last)


def own_step_count(optimizer: torch.optim.Optimizer) -> int:
    """The optimizer's step count as its per-parameter state says (``state[p]["step"]``).

    After loading a checkpoint of another optimizer class (``torch.optim.AdamW`` at step 300)
    the instrumented optimizer's own counter may start at 0 while its state (and its bias
    corrections) continue from 300: the recorder numbers steps from the state. Read once, when
    a recorder starts (a host read of the step tensors).
    """
    best = 0
    for state in optimizer.state.values():
        step = state.get("step") if isinstance(state, Mapping) else None
        if step is None:
            continue
        value = float(step) if not torch.is_tensor(step) else float(step.detach().reshape(-1)[0])
        if math.isfinite(value):
            best = max(best, int(value))
    return best


def checkpoint_position(rec: "Recorder") -> dict[str, Any]:
    """The recorder's entry of a checkpoint: identity, position, running aggregates, the
    hyperparameters last in force and the store's position of the run (after a sync)."""
    info = rec.store.conn.execute("SELECT name, started_at FROM runs WHERE run_id=?", (rec.run_id,)).fetchone()
    names, _ = rec._hyper_in_force()
    last = rec._capture.last_hyper
    if last is not None:
        values = [[float(v) for v in hp] for hp in last]
    elif rec._saved_hyper is not None:
        values = [list(v) for v in rec._saved_hyper[1]]
    else:
        values = None
    return {
        "run_id": rec.run_id,
        "run_name": info[0],
        "started_at": info[1],
        "store": str(rec.store.path.resolve()),
        "step": rec.optimizer.steps_done + rec._step_offset,
        "step_offset": rec._step_offset,
        "epoch": rec._epoch,
        "epoch_start_step": rec._epoch_start_step,
        "step_every": rec.step_every,
        "flush_every": rec.flush_every,
        "step_figures": list(STEP_FIGURES),
        "epoch_aggregates": rec._writer.aggregates.state(),
        "staged_metrics": dict(rec._staged_metrics),
        "last_hyper": {"names": list(names), "values": values} if values is not None else None,
        "diverged": rec.diverged,
        "store_position": rec.store.position(rec.run_id),
    }


def _inactive_rank(
    cls: type["Recorder"], ckpt: dict[str, Any], optimizer: torch.optim.Optimizer, model: torch.nn.Module | None,
    rank_options: Mapping[str, Any], *, load_optimizer: bool = True, overrides: Mapping[str, Any] | None = None,
    seed: int | None = None, epoch_start_step: int | None = None, step_every: int | None = None,
    flush_every: int | None = None,
) -> "Recorder | None":
    """On a rank that does not record (see `Recorder`'s `ranks`): loads the checkpoint's states
    like rank 0 does and returns an inactive recorder at its position, without touching the store
    (rank 0 resumes or branches the run). None on a recording rank."""
    rec = cls.__new__(cls)
    rec._setup_ranks(**rank_options)
    if rec.active:
        return None
    optimizer = rec._bind_ranks(optimizer)
    load_start(ckpt, optimizer, model, load_optimizer, overrides, seed)
    position = ckpt["recorder"]
    # Sharded: this rank flushes with rank 0 (see Recorder._setup_inactive), at rank 0's intervals.
    rec._inactive_step_every = int(step_every if step_every is not None else position["step_every"])
    rec._inactive_flush_every = int(flush_every if flush_every is not None else position["flush_every"])
    rec._setup_inactive(optimizer, model)
    rec._step_offset = int(position["step"]) - int(optimizer.steps_done)
    rec._epoch = int(position["epoch"])
    rec._epoch_start_step = int(position["step"]) if epoch_start_step is None else int(epoch_start_step)
    rec.extra = ckpt.get("extra")
    return rec


def _mark_gap(store: RunStore, run_id: int, expected: Mapping[str, Any], error: StoreGapError) -> None:
    """Marks what the store lacks of a checkpoint's position: steps and epochs after what it holds."""
    held = store.position(run_id)

    def after(have: int | None, want: int | None) -> tuple[int | None, int | None]:
        if want is None:
            return None, None
        start = (min(have, want) + 1) if have is not None else 0
        return (start, want) if start <= want else (want, want)  # rows differ inside the range

    from_step, to_step = after(held["last_step"], expected.get("last_step"))
    from_epoch, to_epoch = after(held["last_epoch"], expected.get("last_epoch"))
    store.mark_gap(run_id, from_step=from_step, to_step=to_step, from_epoch=from_epoch, to_epoch=to_epoch,
                   reason=f"resumed with on_gap='mark': {error}")


def resume(
    cls: type["Recorder"],
    checkpoint: str | Path,
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module | None = None,
    store: RunStore | str | Path | None = None,
    *,
    map_location: Any = "cpu",
    tensorboard: str | Path | None = None,
    takeover: bool = False,
    on_gap: str = "refuse",
    rank_options: Mapping[str, Any] | None = None,
) -> "Recorder":
    """See `Recorder.resume`."""
    if on_gap not in ON_GAP:
        raise ValueError(f"on_gap must be one of {ON_GAP}, got {on_gap!r}")
    ckpt = load_checkpoint(checkpoint, map_location=map_location)
    position = ckpt["recorder"]
    inactive = _inactive_rank(cls, ckpt, optimizer, model, rank_options or {},
                              epoch_start_step=position["epoch_start_step"])
    if inactive is not None:
        return inactive
    return resume_position(cls, position, optimizer, model, store, ckpt=ckpt, checkpoint=checkpoint,
                           tensorboard=tensorboard, takeover=takeover, on_gap=on_gap, rank_options=rank_options)


def resume_position(
    cls: type["Recorder"],
    position: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module | None = None,
    store: RunStore | str | Path | None = None,
    *,
    ckpt: Mapping[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    tensorboard: str | Path | None = None,
    takeover: bool = False,
    on_gap: str = "refuse",
    rank_options: Mapping[str, Any] | None = None,
) -> "Recorder":
    """Continues a run from a recorder position (`checkpoint_position`).

    With `ckpt` (our checkpoint's payload) the model, optimizer and RNG states are loaded from it
    first; without, they must already be restored — a framework (Lightning, Hugging Face) restores
    them from its own checkpoint, which carries the position. `checkpoint` is the file recorded as
    the run's checkpoint, if any.
    """
    if on_gap not in ON_GAP:
        raise ValueError(f"on_gap must be one of {ON_GAP}, got {on_gap!r}")
    probe = cls.__new__(cls)
    probe._setup_ranks(**(rank_options or {}))
    optimizer = probe._bind_ranks(optimizer)
    if not probe.active:  # the states are loaded (by the framework): only the position to take
        probe._inactive_step_every, probe._inactive_flush_every = position["step_every"], position["flush_every"]
        probe._setup_inactive(optimizer, model)
        probe._step_offset = int(position["step"]) - int(optimizer.steps_done)
        probe._epoch = int(position["epoch"])
        probe._epoch_start_step = int(position["epoch_start_step"])
        return probe
    if list(position["step_figures"]) != list(STEP_FIGURES):
        raise CheckpointError(
            f"the checkpoint was written with step figures {position['step_figures']}, this version records "
            f"{list(STEP_FIGURES)}: finish the run with the version that started it"
        )
    owns_store = not isinstance(store, RunStore)
    store_obj = store if not owns_store else RunStore(store if store is not None else position["store"])
    run_id = int(position["run_id"])
    leased = False
    try:
        run = store_obj.conn.execute("SELECT name, started_at FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if run is None or tuple(run) != (position["run_name"], position["started_at"]):
            raise CheckpointError(
                f"run {run_id} ({position['run_name']!r}, started {position['started_at']}) of this "
                f"checkpoint is not in {store_obj.path}: pass the store the run was recorded in"
            )
        if ckpt is not None:
            check_fits(ckpt, optimizer, model, load_optimizer=True)  # a wrong checkpoint is told first
        # Before anything changes: a run another live process writes is refused here.
        store_obj.acquire_lease(run_id, takeover=takeover)
        leased = True
        expected = position.get("store_position")
        if expected is not None:  # checkpoints written before positions were recorded have none
            try:
                store_obj.verify_position(run_id, expected, option="on_gap='mark'")
            except StoreGapError as e:
                if on_gap == "refuse":
                    raise
                _mark_gap(store_obj, run_id, expected, e)
        if ckpt is not None:
            load_into(ckpt, optimizer, model, load_optimizer=True)
        if optimizer.steps_done + position["step_offset"] != position["step"]:
            raise CheckpointError("the optimizer's step counter does not match the checkpoint's position")
        if ckpt is not None:
            set_rng_state(ckpt["rng"])
        rec = cls.__new__(cls)
        rec._setup_ranks(**(rank_options or {}))
        rec._combiner = probe._combiner
        rec._setup(optimizer, store_obj, model, position["step_every"], position["flush_every"], tensorboard, owns_store)
    except BaseException:
        if leased:
            store_obj.release_lease(run_id)
        if owns_store:
            store_obj.close()
        raise
    rec.run_id = run_id
    rec.run_name = position["run_name"]
    rec._step_offset = int(position["step_offset"])
    rec._epoch = int(position["epoch"])
    rec._epoch_start_step = int(position["epoch_start_step"])
    rec._staged_metrics = dict(position["staged_metrics"])
    hyper = saved_hyper(position)
    if hyper is not None:
        rec._saved_hyper = hyper
    rec.extra = ckpt.get("extra") if ckpt is not None else None
    rec._start_writer()
    if "epoch_aggregates" in position:
        rec._writer.aggregates = EpochAggregates.from_state(position["epoch_aggregates"])
    elif "epoch_figures" in position:  # a checkpoint of the version that kept every step's figures
        rec._writer.aggregates = EpochAggregates.from_figures(position["epoch_figures"].cpu().double().numpy())
    # With the store's position, late metrics logged after the checkpoint go too.
    rec.store.truncate_run(rec.run_id, step=int(position["step"]), epoch=rec._epoch, position=expected)
    if position.get("diverged"):  # it had diverged before the checkpoint: still so
        rec._writer.mark_diverged(position["diverged"])
    # (again) the checkpoint resumed from: a crash may have come between its file and its row
    if checkpoint is not None:
        rec.store.record_checkpoint(rec.run_id, int(position["step"]), rec._epoch, checkpoint)
    rec._attach()
    return rec


def branch(
    cls: type["Recorder"],
    checkpoint: str | Path,
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module | None = None,
    store: RunStore | str | Path | None = None,
    *,
    run_name: str,
    overrides: Mapping[str, Any] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    load_optimizer_state: bool = True,
    seed: int | None = None,
    map_location: Any = "cpu",
    **kwargs: Any,
) -> "Recorder":
    """See `Recorder.branch`."""
    ckpt = load_checkpoint(checkpoint, map_location=map_location)
    position = ckpt["recorder"]
    rank_options = {k: kwargs.pop(k) for k in ("ranks", "check_ranks", "rank_rtol", "on_rank_mismatch") if k in kwargs}
    inactive = _inactive_rank(cls, ckpt, optimizer, model, rank_options, load_optimizer=load_optimizer_state,
                              overrides=overrides, seed=seed, step_every=kwargs.get("step_every"),
                              flush_every=kwargs.get("flush_every"))
    if inactive is not None:
        return inactive
    wrapper, optimizer = optimizer, unwrap_optimizer(optimizer)
    owns_store = not isinstance(store, RunStore)
    store_obj = store if not owns_store else RunStore(store if store is not None else position["store"], create=False)
    try:
        parent = store_obj.run_info(position["run_id"])
        for key in overrides or {}:
            missing = [g for g, group in enumerate(optimizer.param_groups) if key not in group]
            if missing:
                raise KeyError(f"override {key!r} is not a setting of {type(optimizer).__name__}'s param groups")
        load_start(ckpt, optimizer, model, load_optimizer_state, overrides, seed)
        if hyperparameters is None:
            hyperparameters = {**(parent["hyperparameters"] or {}), **(overrides or {})}
        rec = cls.__new__(cls)
        rec._setup_ranks(**rank_options)
        rec._bind_ranks(wrapper)
        rec._setup(
            optimizer, store_obj, model, kwargs.pop("step_every", position["step_every"]),
            kwargs.pop("flush_every", position["flush_every"]), kwargs.pop("tensorboard", None), owns_store,
        )
        rec._step_offset = int(position["step"]) - int(optimizer.steps_done)
        rec._epoch = int(position["epoch"])
        rec._epoch_start_step = int(position["step"])
        rec.extra = ckpt.get("extra")
        version = kwargs.pop("code_version", None)
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        rec.run_id = rec._create_run(
            run_name, hyperparameters, seed if seed is not None else parent["seed"], position["run_id"],
            int(position["epoch"]), version, branch_step=int(position["step"]),
        )
    except BaseException:
        if owns_store:
            store_obj.close()
        raise
    rec._start_writer()
    rec._attach()
    return rec


__all__ = ["resume", "resume_position", "branch", "checkpoint_position", "load_into", "own_step_count", "saved_hyper", "ON_GAP"]
