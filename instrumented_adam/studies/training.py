"""The study's training loop: a root run, and one branch as a worker runs it into its own shard.

Both use the same loop (`train_epochs`): at the start of epoch e the lr of every param group is
set from the schedule (a function of e alone), the task trains the epoch with randomness from
(seed, e), the task's metrics go into the recorder's epoch row, and a checkpoint is written every
`checkpoint_every` epochs and at the end. Hence a branch without overrides repeats exactly what
its parent did after the checkpoint, and a retried branch continues from its last checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from ..telemetry.checkpoint import CHECKPOINT_FORMAT, seed_everything, set_rng_state
from ..telemetry.recorder import Recorder
from ..telemetry.store import RunStore
from .protocol import TrainingTask, epoch_seed, load_task
from .plain import PlainRecorder
from .spec import INSTRUMENTED, build_optimizer, optimizer_settings, same_state_family, schedule_lr

#: Key of a run's hyperparameters holding the study settings (task, optimizer, schedule, ...).
STUDY_KEY = "study"


def checkpoint_name(epochs_done: int) -> str:
    return f"epoch-{int(epochs_done):05d}.pt"


def _set_lr(optimizer: torch.optim.Optimizer, schedule: str, base_lr: float, epoch: int, horizon: int) -> None:
    lr = schedule_lr(schedule, base_lr, epoch, horizon)
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def train_epochs(task: TrainingTask, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rec: Recorder, *,
                 seed: int, until: int, schedule: str, base_lr: float, horizon: int, checkpoint_dir: Path,
                 checkpoint_every: int) -> list[dict[str, float]]:
    """Trains from the recorder's epoch to `until` (exclusive), recording and checkpointing."""
    rows = []
    model.train()
    while rec.epoch < until:
        epoch = rec.epoch
        _set_lr(optimizer, schedule, base_lr, epoch, horizon)
        extra = task.train_epoch(model, optimizer, epoch, seed) or {}
        metrics = {**dict(task.evaluate(model)), **dict(extra)}
        rows.append(rec.end_epoch(**metrics))
        done = epoch + 1
        if done % checkpoint_every == 0 or done == until:
            rec.save_checkpoint(checkpoint_dir / checkpoint_name(done), model)
    return rows


def study_settings(run_hyperparameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """The study settings a run was trained with (raises ValueError for a run of no study)."""
    settings = (run_hyperparameters or {}).get(STUDY_KEY)
    if not isinstance(settings, Mapping):
        raise ValueError("the run was not trained by a study (its hyperparameters have no 'study' entry): branch a "
                         "run trained with Study.train_root, or import a checkpoint with Study.import_checkpoint")
    return dict(settings)


def train_root(store: RunStore | str | Path, checkpoint_dir: str | Path, *, task: str, task_kwargs: Mapping[str, Any] | None,
               epochs: int, seed: int = 0, optimizer: Mapping[str, Any] | None = None, schedule: str = "constant",
               checkpoint_every: int = 1, run_name: str | None = None) -> int:
    """Trains a root run of a study in this process; returns its run id (see `Study.train_root`)."""
    task_obj = load_task(task, task_kwargs)
    opt_spec = {**dict(task_obj.default_optimizer()), **dict(optimizer or {})}
    cls_name = opt_spec.pop("optimizer", "Adam")
    if cls_name not in INSTRUMENTED:
        raise ValueError(f"a root run trains with an instrumented optimizer ({', '.join(sorted(INSTRUMENTED))}); "
                         f"{cls_name} is for branches")
    settings = optimizer_settings(cls_name, opt_spec, {})
    seed_everything(seed)
    model = task_obj.model(seed)
    opt = build_optimizer(cls_name, model.parameters(), settings)
    study = {"task": task, "task_kwargs": dict(task_kwargs or {}), "optimizer": cls_name, "settings": settings,
             "schedule": schedule, "horizon": int(epochs), "checkpoint_every": int(checkpoint_every)}
    hyper = {"task": task_obj.name, **dict(task_obj.hyperparameters()), STUDY_KEY: study}
    rec = Recorder(opt, store, run_name=run_name or f"{task_obj.name}-root-s{seed}", model=model, hyperparameters=hyper,
                   seed=seed)
    directory = Path(checkpoint_dir) / f"run-{rec.run_id}"
    try:
        train_epochs(task_obj, model, opt, rec, seed=seed, until=int(epochs), schedule=schedule,
                     base_lr=float(settings.get("lr", opt.defaults["lr"])), horizon=int(epochs), checkpoint_dir=directory,
                     checkpoint_every=int(checkpoint_every))
    except BaseException:
        rec.close("failed")
        raise
    rec.close()
    return rec.run_id


def _plain_step(optimizer_state: Mapping[str, Any]) -> int:
    """The step count a torch.optim state_dict says (its parameters' ``step``)."""
    steps = [float(s["step"]) for s in optimizer_state.get("state", {}).values() if "step" in s]
    return int(max(steps, default=0))


def _load_raw(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def run_branch(*, branch_id: str, spec: Mapping[str, Any], directory: str, checkpoint: str, parent_header: Mapping[str, Any],
               parent_run: int, study: Mapping[str, Any], run_name: str, plain: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Trains one branch into ``directory/shard.sqlite`` (a worker's job; see `Study.sweep`).

    Fresh: the shard is created with the parent's run header (its id as the checkpoint knows it),
    the branch's run is started from the checkpoint with the spec's optimizer and overrides. A
    retry (the shard and a checkpoint of the branch exist) resumes from its last checkpoint,
    taking the dead worker's lease over. Returns what the driver needs to merge the shard.
    """
    directory_path = Path(directory)
    shard_path = directory_path / "shard.sqlite"
    ckpt_dir = directory_path / "checkpoints"
    id_map_path = directory_path / "id_map.json"
    overrides = dict(spec.get("overrides") or {})
    at_epoch, epochs = int(spec["at_epoch"]), int(spec["epochs"])
    until = at_epoch + epochs
    task = load_task(study["task"], study.get("task_kwargs"))
    parent_cls = study["optimizer"]
    cls_name = overrides.get("optimizer", parent_cls)
    settings = optimizer_settings(cls_name, study["settings"], overrides)
    schedule = overrides.get("schedule", study.get("schedule", "constant"))
    horizon = int(study.get("horizon", until))
    base_lr = float(settings.get("lr", 1e-3))
    parent_seed = int(parent_header["seed"]) if parent_header.get("seed") is not None else 0
    seed = parent_seed if spec.get("seed") is None else int(spec["seed"])
    model = task.model(seed)
    opt = build_optimizer(cls_name, model.parameters(), settings)
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]

    result = {"branch_id": branch_id, "shard": str(shard_path)}
    rec = None
    if shard_path.exists():
        shard = RunStore(shard_path)
        runs = shard.runs()
        mine = runs[runs["name"] == run_name]
        ckpts = shard.checkpoints(int(mine["run_id"].iloc[-1])) if len(mine) else None
        if len(mine) and mine["status"].iloc[-1] == "finished":
            # Done before the driver merged it (the driver died): nothing to train.
            result.update(run_id=int(mine["run_id"].iloc[-1]), id_map=json.loads(id_map_path.read_text()))
            shard.close()
            return result
        if ckpts is not None and len(ckpts):
            last = ckpts.sort_values("step").iloc[-1]
            shard.close()
            if cls_name in INSTRUMENTED:
                rec = Recorder.resume(last["path"], opt, model, shard_path, takeover=True)
            else:
                rec = PlainRecorder.resume(last["path"], opt, model, shard_path)
            for group, fresh in zip(opt.param_groups, fresh_groups):
                group.update(fresh)
        else:
            shard.close()
    if rec is None:
        if directory_path.exists():
            shutil.rmtree(directory_path)  # a start that left no checkpoint: begin again
        ckpt_dir.mkdir(parents=True)
        shard = RunStore(shard_path, create=True)
        raw = _load_raw(checkpoint)
        ours = isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT
        stub = int(raw["recorder"]["run_id"]) if ours else int(parent_run)
        shard.add_run_header({**parent_header, "run_id": stub})
        shard.close()
        id_map_path.write_text(json.dumps({str(stub): int(parent_run)}))  # the driver maps the stub back to the parent
        parent_hyper = json.loads(parent_header["hyperparameters"]) if isinstance(parent_header.get("hyperparameters"), str) \
            else dict(parent_header.get("hyperparameters") or {})
        branch_study = {**dict(study), "optimizer": cls_name, "settings": settings, "schedule": schedule}
        hyper = {**parent_hyper, **{k: v for k, v in overrides.items() if k not in ("optimizer", "schedule")},
                 STUDY_KEY: branch_study, "study_branch": {"id": branch_id, **dict(spec)}}
        keep_state = same_state_family(parent_cls, cls_name)
        if cls_name not in INSTRUMENTED:  # torch.optim's SGD/RMSprop: the weights carry over, not the state
            model.load_state_dict(raw["model"] if ours else raw[plain["model_key"]])
            if ours and seed == parent_seed:
                set_rng_state(raw["rng"])
            else:
                seed_everything(epoch_seed(seed, at_epoch))
            step = int(raw["recorder"]["step"]) if ours else _plain_step(raw[plain["optimizer_key"]])
            rec = PlainRecorder(opt, shard_path, run_name, model=model, hyperparameters=hyper, seed=seed,
                                parent_run=stub, branch_epoch=at_epoch, branch_step=step)
        elif ours:
            # The new optimizer's own settings over the loaded ones (AdamW's decoupled decay, the overrides).
            rec = Recorder.branch(checkpoint, opt, model, shard_path, run_name=run_name, hyperparameters=hyper,
                                  overrides=fresh_groups[0], load_optimizer_state=keep_state,
                                  seed=None if seed == parent_seed else epoch_seed(seed, at_epoch))
        else:
            model.load_state_dict(raw[plain["model_key"]])
            if keep_state:
                opt.load_state_dict(raw[plain["optimizer_key"]])
            for group, fresh in zip(opt.param_groups, fresh_groups):
                group.update(fresh)
            seed_everything(epoch_seed(seed, at_epoch))
            opt.epochs_done = at_epoch  # the recorder numbers epochs from here
            rec = Recorder(opt, shard_path, run_name=run_name, model=model, hyperparameters=hyper, seed=seed,
                           parent_run=stub, branch_epoch=at_epoch)
    try:
        train_epochs(task, model, opt, rec, seed=seed, until=until, schedule=schedule, base_lr=base_lr, horizon=horizon,
                     checkpoint_dir=ckpt_dir, checkpoint_every=int(study.get("checkpoint_every", 1)))
    except BaseException:
        rec.close("failed")
        raise
    run_id = rec.run_id
    rec.close()
    result.update(run_id=int(run_id), id_map=json.loads(id_map_path.read_text()))
    return result


__all__ = ["train_root", "train_epochs", "run_branch", "study_settings", "checkpoint_name", "STUDY_KEY"]
