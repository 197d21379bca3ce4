"""The study driver: roots, branch specs, sweeps through an executor, and the merge of shards.

    study = Study("runs/exp.sqlite")                               # study files in runs/exp.study/
    root = study.train_root("instrumented_adam.demo.study_tasks:make_task", {"name": "digits"}, epochs=30)
    result = study.sweep(root, at_epochs=[10, 20], grid={"lr": [1e-4, 3e-4, 1e-3]}, seeds=3, epochs=10)
    result.summary()                                               # finished / failed / reused

Only the driver writes the study's store. Every branch trains in a worker into its own shard
(``<study dir>/branches/<branch id>/shard.sqlite``, next to its checkpoints); a finished shard is
merged into the store in one transaction together with the branch's row in ``study_branches``, in
the order of the specs (so the same sweep gives the same store whatever the executor and the
order branches finish in). A worker that dies leaves an unmerged shard: nothing of it is in the
store, and the retried job resumes from the shard's last checkpoint.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..telemetry.store import RunStore
from .executor import Executor, Job, JobResult, LocalExecutor
from .protocol import load_task
from .spec import BranchSpec, grid as make_grid, sweep_specs, validate
from .training import STUDY_KEY, study_settings, train_root

#: The job function every branch runs (a reference, so that it travels to workers).
BRANCH_JOB = "instrumented_adam.studies.training:run_branch"


@dataclass
class Progress:
    """The state of a sweep: counts of branches and an ETA from the mean branch time so far."""

    total: int
    reused: int = 0
    done: int = 0
    failed: int = 0
    running: int = 0
    started_at: float = field(default_factory=time.monotonic)
    seconds: list[float] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.total - self.reused - self.done - self.failed

    def eta(self, parallel: int) -> float | None:
        """Seconds left (None before a first branch finished)."""
        if not self.seconds:
            return None
        return sum(self.seconds) / len(self.seconds) * max(0, self.remaining - self.running / 2) / max(1, parallel)

    def line(self, parallel: int = 1) -> str:
        eta = self.eta(parallel)
        eta_text = "?" if eta is None else f"{eta:.0f} s"
        return (f"branches: {self.done + self.reused}/{self.total} done ({self.reused} already in the store), "
                f"{self.running} running, {self.failed} failed, ETA {eta_text}")


@dataclass
class SweepResult:
    """What a sweep did: per spec id, its status ('finished', 'failed', 'reused'), run id and error."""

    specs: list[BranchSpec]
    status: dict[str, str]
    run_ids: dict[str, int | None]
    errors: dict[str, str]
    trained: int

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.status.values():
            out[s] = out.get(s, 0) + 1
        return out


class Study:
    """Branching studies recorded in one store (see the module docstring).

    Args:
        store: the study's store (created if missing).
        directory: where roots' checkpoints and branches' shards go (default: the store's path
            with ``.study``); every worker must reach it (a shared file system on a cluster).
        executor: a `LocalExecutor` (default) or `RayExecutor`.
    """

    def __init__(self, store: str | Path, directory: str | Path | None = None, *, executor: Executor | None = None) -> None:
        self.store_path = Path(store)
        self.directory = Path(directory) if directory is not None else self.store_path.with_suffix(".study")
        self.executor = executor or LocalExecutor()

    def _open(self) -> RunStore:
        store = RunStore(self.store_path, create=True)
        store.ensure_study_tables()
        return store

    # ---- roots --------------------------------------------------------------------------------
    def train_root(self, task: str, task_kwargs: Mapping[str, Any] | None = None, *, epochs: int, seed: int = 0,
                   optimizer: Mapping[str, Any] | None = None, schedule: str = "constant", checkpoint_every: int = 1,
                   run_name: str | None = None) -> int:
        """Trains a root run in this process with task reference `task` (``"module:factory"``),
        checkpointing every `checkpoint_every` epochs (the epochs branches can start from)."""
        with self._open():
            pass
        return train_root(self.store_path, self.directory / "roots", task=task, task_kwargs=task_kwargs, epochs=epochs,
                          seed=seed, optimizer=optimizer, schedule=schedule, checkpoint_every=checkpoint_every,
                          run_name=run_name)

    def import_checkpoint(self, path: str | Path, task: str, task_kwargs: Mapping[str, Any] | None = None, *, epoch: int,
                          model_key: str = "model", optimizer_key: str = "optimizer", optimizer: str | None = None,
                          seed: int = 0, schedule: str = "constant", horizon: int | None = None,
                          run_name: str | None = None) -> int:
        """Makes a checkpoint written without this package a root: a file holding a model
        state_dict (under `model_key`) and a ``torch.optim.Adam``/``AdamW`` state_dict (under
        `optimizer_key`) after `epoch` epochs, loaded weights-only. Its run (status 'finished',
        no rows) records where the file is and its sha256; branches start from it."""
        path = Path(path).resolve()
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict) or model_key not in raw or optimizer_key not in raw:
            raise ValueError(f"{path} holds {sorted(raw) if isinstance(raw, dict) else type(raw).__name__}: expected a "
                             f"model state_dict under {model_key!r} and an optimizer state_dict under {optimizer_key!r}")
        groups = raw[optimizer_key].get("param_groups") if isinstance(raw[optimizer_key], dict) else None
        if not groups:
            raise ValueError(f"{path}[{optimizer_key!r}] is not an optimizer state_dict")
        group = {k: v for k, v in groups[0].items() if k != "params"}
        cls_name = optimizer or ("AdamW" if group.get("decoupled_weight_decay") else "Adam")
        settings = validate(cls_name, group, {})
        steps = [float(s["step"]) for s in raw[optimizer_key].get("state", {}).values() if "step" in s]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        study = {"task": task, "task_kwargs": dict(task_kwargs or {}), "optimizer": cls_name, "settings": settings,
                 "schedule": schedule, "horizon": int(horizon if horizon is not None else epoch),
                 "checkpoint_every": 1, "plain": {"model_key": model_key, "optimizer_key": optimizer_key}}
        name = run_name or f"import-{path.stem}"
        task_obj = load_task(task, task_kwargs)
        with self._open() as store:
            runs = store.runs()
            for rid, hyper in zip(runs["run_id"], runs["hyperparameters"]):
                if (hyper or {}).get("sha256") == digest and (hyper.get(STUDY_KEY) or {}).get("task") == task:
                    ckpts = store.checkpoints(int(rid))
                    if (ckpts["epochs_done"] == int(epoch)).any():
                        return int(rid)  # imported before: the same root (content-addressed)
            run_id = store.create_run(name, hyperparameters={"task": task_obj.name, STUDY_KEY: study,
                                                             "imported_checkpoint": str(path), "sha256": digest},
                                      seed=seed, optimizer=cls_name, optimizer_config=[group], package_version=None)
            store.record_checkpoint(run_id, int(max(steps, default=0)), int(epoch), path)
            store.set_status(run_id, "finished", detail=f"imported from {path} (sha256 {digest[:12]}…): no rows")
            store.release_lease(run_id)
        return run_id

    # ---- branches -----------------------------------------------------------------------------
    def _parent(self, store: RunStore, parent: int | str) -> tuple[int, dict[str, Any], dict[str, Any], str]:
        run_id = store.run_id(parent)
        header = store.run_header(run_id)
        info = store.run_info(run_id)
        settings = study_settings(info["hyperparameters"])
        plain = settings.get("plain")
        identity = (f"file:{info['hyperparameters']['sha256']}" if plain else f"run:{header['name']}@{header['started_at']}")
        return run_id, header, settings, identity

    def _checkpoint(self, store: RunStore, run_id: int, epoch: int) -> str:
        ckpts = store.checkpoints(run_id)
        at = ckpts[ckpts["epochs_done"] == int(epoch)]
        if at.empty:
            have = sorted(set(int(e) for e in ckpts["epochs_done"]))
            raise ValueError(f"run {run_id} has no checkpoint after epoch {epoch} (it has: {have or 'none'})")
        return str(at.sort_values("step").iloc[-1]["path"])

    def specs(self, parent: int | str, at_epochs: Sequence[int], *, grid: Mapping[str, Sequence[Any]] | None = None,
              overrides: Sequence[Mapping[str, Any]] | None = None, seeds: int | Sequence[int | None] = 1,
              epochs: int = 1) -> list[BranchSpec]:
        """The branch specs of a sweep, validated (optimizer rules, checkpoints present)."""
        with self._open() as store:
            run_id, header, settings, identity = self._parent(store, parent)
            parent_seed = int(header["seed"]) if header["seed"] is not None else 0
            if isinstance(seeds, int):
                if seeds < 1:
                    raise ValueError(f"seeds must be >= 1, got {seeds}")
                seed_list: list[int | None] = [None] + [parent_seed + i for i in range(1, seeds)]
            else:
                seed_list = [None if (s is None or int(s) == parent_seed) else int(s) for s in seeds]
            points = make_grid(grid, overrides)
            for point in points:
                cls_name = point.get("optimizer", settings["optimizer"])
                validate(cls_name, settings["settings"], point)
            for at in at_epochs:
                self._checkpoint(store, run_id, int(at))
        return sweep_specs(identity, [int(a) for a in at_epochs], points, int(epochs), seed_list)

    def branch(self, parent: int | str, at_epoch: int, overrides: Mapping[str, Any] | None = None, *, epochs: int = 1,
               seed: int | None = None, progress: Callable[[Progress], None] | None = None) -> SweepResult:
        """One branch (a sweep of one spec)."""
        return self.sweep(parent, [at_epoch], overrides=[dict(overrides or {})], seeds=[seed], epochs=epochs,
                          progress=progress)

    def sweep(self, parent: int | str, at_epochs: Sequence[int], *, grid: Mapping[str, Sequence[Any]] | None = None,
              overrides: Sequence[Mapping[str, Any]] | None = None, seeds: int | Sequence[int | None] = 1,
              epochs: int = 1, progress: Callable[[Progress], None] | None = None) -> SweepResult:
        """Branches from `parent` at each of `at_epochs`, with each override set (the product of
        `grid`, or the list `overrides`), each seed (``seeds=3``: the parent's seed and two
        more; or a list) for `epochs` epochs. Branches already in the store are not trained
        again; the others run on the executor, and each finished one is merged."""
        specs = self.specs(parent, at_epochs, grid=grid, overrides=overrides, seeds=seeds, epochs=epochs)
        with self._open() as store:
            run_id, header, settings, _ = self._parent(store, parent)
            known = store.study_branches().set_index("branch_id")
            status: dict[str, str] = {}
            run_ids: dict[str, int | None] = {}
            errors: dict[str, str] = {}
            jobs: list[Job] = []
            order: list[str] = []
            spec_of = {s.id: s for s in specs}
            for spec in specs:
                if spec.id in known.index and known.loc[spec.id, "status"] == "finished":
                    status[spec.id] = "reused"
                    run_ids[spec.id] = int(known.loc[spec.id, "run_id"])
                    continue
                payload = {
                    "branch_id": spec.id, "spec": spec.to_dict(), "directory": str(self.directory / "branches" / spec.id),
                    "checkpoint": self._checkpoint(store, run_id, spec.at_epoch), "parent_header": header,
                    "parent_run": run_id, "study": settings, "run_name": f"{header['name']} {spec.label()}",
                    "plain": settings.get("plain"),
                }
                store.set_study_branch(spec.id, spec=spec.to_dict(), status="pending", parent_run=run_id,
                                       branch_epoch=spec.at_epoch, seed=spec.seed)
                jobs.append(Job(spec.id, BRANCH_JOB, payload))
                order.append(spec.id)
        state = Progress(total=len(specs), reused=sum(1 for s in status.values() if s == "reused"))
        arrived: dict[str, JobResult] = {}
        merged = 0

        def merge_ready() -> None:
            # In spec order, so that run ids do not depend on which worker finished first.
            nonlocal merged
            with self._open() as store:
                while merged < len(order) and order[merged] in arrived:
                    key = order[merged]
                    result = arrived[key]
                    spec = spec_of[key]
                    row = {"branch_id": key, "spec": spec.to_dict(), "parent_run": run_id, "branch_epoch": spec.at_epoch,
                           "seed": spec.seed, "attempts": result.attempts}
                    if result.status == "finished":
                        value = result.value
                        ids = store.merge_shard(value["shard"], [value["run_id"]],
                                                {int(k): int(v) for k, v in value["id_map"].items()},
                                                {**row, "status": "finished", "run_id": value["run_id"]})
                        status[key], run_ids[key] = "finished", ids[value["run_id"]]
                    else:
                        store.set_study_branch(key, **{k: v for k, v in row.items() if k != "branch_id"}, status="failed",
                                               error=result.error)
                        status[key], run_ids[key], errors[key] = "failed", None, result.error or ""
                    merged += 1

        def on_start(key: str, attempt: int) -> None:
            state.running += 1 if attempt == 1 else 0
            if progress is not None:
                progress(state)

        def on_result(result: JobResult) -> None:
            state.running -= 1
            if result.status == "finished":
                state.done += 1
                state.seconds.append(result.seconds)
            else:
                state.failed += 1
            arrived[result.key] = result
            merge_ready()
            if progress is not None:
                progress(state)

        if jobs:
            self.executor.run(jobs, on_result=on_result, on_start=on_start)
        elif progress is not None:
            progress(state)
        return SweepResult(specs, status, run_ids, errors, trained=len(jobs))


def print_progress(state: Progress) -> None:
    """A progress callback printing one line per change to stderr."""
    print(state.line(), file=sys.stderr, flush=True)


__all__ = ["Study", "SweepResult", "Progress", "print_progress", "BRANCH_JOB"]
