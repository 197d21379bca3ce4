"""The study commands of ``instrumented-adam``: train, branch, sweep, study-report, runs --tree.

    instrumented-adam train STORE --task digits --epochs 30            a root run, checkpointed per epoch
    instrumented-adam branch STORE RUN --at-epoch 10 --set lr=3e-4 --set betas=0.9,0.99
    instrumented-adam sweep STORE RUN --at-epoch 10,20 --grid lr=1e-4,3e-4,1e-3 --seeds 3 --epochs 10
    instrumented-adam study-report STORE                               tree, overlays, comparison table
    instrumented-adam runs STORE --tree                                the provenance tree

RUN is a run of STORE trained by a study, or a checkpoint file written without this package (a
model state_dict and a torch.optim.Adam/AdamW state_dict; ``--model-key``/``--optimizer-key``),
which becomes a root of the tree. ``--task`` is a built-in task's name or a user's factory as
``package.module:make_task`` (``--task-arg KEY=VALUE`` passes it arguments).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

#: The built-in study tasks' factory.
BUILTIN_TASK_REF = "instrumented_adam.demo.study_tasks:make_task"
BUILTIN_TASKS = ("linreg", "digits")


def _task(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    from ..studies.spec import parse_assignment

    kwargs = dict(parse_assignment(a) for a in (args.task_arg or []))
    if args.task in BUILTIN_TASKS:
        return BUILTIN_TASK_REF, {"name": args.task, **kwargs}
    return args.task, kwargs


def _executor(args: argparse.Namespace):
    from ..studies.executor import LocalExecutor, RayExecutor, SerialExecutor

    if args.executor == "ray":
        return RayExecutor(args.address, num_cpus=args.cpus_per_branch, num_gpus=args.gpus_per_branch,
                           max_retries=args.max_retries)
    if args.executor == "serial":
        return SerialExecutor()
    return LocalExecutor(args.workers, max_retries=args.max_retries)


def _add_task_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--task", required=required, default=None,
                   help=f"a built-in task ({', '.join(BUILTIN_TASKS)}) or a factory 'package.module:make_task'")
    p.add_argument("--task-arg", action="append", metavar="KEY=VALUE", help="an argument of the task's factory (repeatable)")


def _add_branch_options(p: argparse.ArgumentParser, sweep: bool) -> None:
    from .cli import positive_int

    p.add_argument("store", type=Path, help="the study's run store (.sqlite)")
    p.add_argument("run", help="the parent: a run name or id of STORE, or a checkpoint file (.pt) made without this package")
    p.add_argument("--at-epoch", required=True, help="branch after this many epochs" + (" (a comma list)" if sweep else ""))
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="an override: lr, betas=0.9,0.99, eps, weight_decay, amsgrad, optimizer=AdamW|Adamax, "
                        "schedule=constant|cosine[:H]|exp:G|step:E:G (repeatable)")
    if sweep:
        p.add_argument("--grid", action="append", metavar="KEY=V1,V2,...", default=[],
                       help="a grid axis (values split at ',', or at ';' when a value is itself a list: "
                            "'betas=0.9,0.99;0.95,0.999'); the sweep is the product of the axes")
        p.add_argument("--seeds", default="1", help="a count (the parent's seed and N-1 more) or a comma list of seeds")
    else:
        p.add_argument("--seed", type=int, default=None, help="the branch's seed (default: the parent's, its RNG state)")
    p.add_argument("--epochs", type=positive_int, default=1, help="epochs each branch trains (default: 1)")
    p.add_argument("--study-dir", type=Path, help="where shards and checkpoints go (default: STORE with .study)")
    p.add_argument("--executor", choices=["local", "ray", "serial"], default="local",
                   help="local worker processes (default), a Ray cluster, or this process")
    p.add_argument("--workers", type=positive_int, default=None, help="local worker processes (default: one per CPU)")
    p.add_argument("--address", default=None, help="the Ray cluster (ray.init's address, e.g. auto)")
    p.add_argument("--cpus-per-branch", type=float, default=1.0, help="Ray: CPUs per branch (its torch threads)")
    p.add_argument("--gpus-per-branch", type=float, default=0.0, help="Ray: GPUs per branch")
    p.add_argument("--max-retries", type=int, default=2, help="retries of a branch whose worker died (default: 2)")
    p.add_argument("--model-key", default="model", help="a plain checkpoint's model state_dict key")
    p.add_argument("--optimizer-key", default="optimizer", help="a plain checkpoint's optimizer state_dict key")
    p.add_argument("--seed-of-checkpoint", type=int, default=0, help="a plain checkpoint's training seed (default 0)")
    _add_task_options(p, required=False)


def add_study_commands(sub) -> None:
    """Adds train, branch, sweep and study-report to the ``instrumented-adam`` parser."""
    from .cli import positive_int

    train = sub.add_parser("train", help="train a study's root run (checkpointed, so that it can be branched)",
                           description="Trains a task with the study protocol, checkpointing every --checkpoint-every "
                                       "epochs: the epochs branches can start from.")
    train.add_argument("store", type=Path, help="the study's run store (.sqlite; created if missing)")
    _add_task_options(train, required=True)
    train.add_argument("--epochs", type=positive_int, required=True)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                       help="optimizer settings: optimizer=Adam|AdamW|Adamax, lr, betas, eps, weight_decay, amsgrad")
    train.add_argument("--schedule", default="constant", help="constant, cosine[:H], exp:G or step:E:G (per epoch)")
    train.add_argument("--checkpoint-every", type=positive_int, default=1)
    train.add_argument("--name", help="the run's name")
    train.add_argument("--study-dir", type=Path)
    train.set_defaults(handler=cmd_train)

    branch = sub.add_parser("branch", help="re-train from an intermediate checkpoint with other settings",
                            description="One branch of RUN after --at-epoch epochs, with --set overrides. A branch "
                                        "already in the store is found, not trained again.")
    _add_branch_options(branch, sweep=False)
    branch.set_defaults(handler=cmd_branch)

    sweep = sub.add_parser("sweep", help="branches over a grid of overrides × seeds × branch epochs",
                           description="Branches RUN at each --at-epoch with each point of the --grid (and the --set "
                                       "overrides), for each seed; runs them on the executor and merges each finished "
                                       "branch into STORE. Re-running it trains only what is missing.")
    _add_branch_options(sweep, sweep=True)
    sweep.set_defaults(handler=cmd_sweep)

    report = sub.add_parser("study-report", help="HTML report of a study: tree, overlays per branch point, comparison",
                            description="Writes one self-contained HTML page: the provenance tree, per branch point the "
                                        "branches overlaid on the parent's continuation, and each branch's final and "
                                        "best validation loss against the parent's, with a CI over seeds.")
    report.add_argument("store", type=Path)
    report.add_argument("--out", type=Path, help="the HTML file (default: STORE with -study.html)")
    report.add_argument("--metric", default="val_loss")
    report.set_defaults(handler=cmd_study_report)
    del positive_int


def cmd_train(args: argparse.Namespace) -> int:
    from ..studies.spec import parse_assignment
    from ..studies.study import Study

    ref, kwargs = _task(args)
    settings = dict(parse_assignment(a) for a in args.set)
    run_id = Study(args.store, args.study_dir).train_root(ref, kwargs, epochs=args.epochs, seed=args.seed,
                                                           optimizer=settings, schedule=args.schedule,
                                                           checkpoint_every=args.checkpoint_every, run_name=args.name)
    print(f"root run {run_id} recorded in {args.store}")
    return 0


def _parent(args: argparse.Namespace, study, at_epochs: list[int]) -> int | str:
    from .cli import UserError

    path = Path(args.run)
    if path.suffix in (".pt", ".pth", ".ckpt") or (path.is_file() and not args.run.isdigit()):
        if not path.is_file():
            raise UserError(f"no checkpoint file {path}")
        if args.task is None:
            raise UserError("branching a plain checkpoint needs --task (the training it came from)")
        if len(at_epochs) != 1:
            raise UserError("a plain checkpoint holds one epoch: give one --at-epoch")
        ref, kwargs = _task(args)
        return study.import_checkpoint(path, ref, kwargs, epoch=at_epochs[0], model_key=args.model_key,
                                       optimizer_key=args.optimizer_key, seed=args.seed_of_checkpoint)
    return args.run


def _run(args: argparse.Namespace, at_epochs: list[int], grid: dict[str, list[Any]] | None, seeds: Any) -> int:
    from ..studies.spec import parse_assignment
    from ..studies.study import Study, print_progress
    from .cli import UserError

    study = Study(args.store, args.study_dir, executor=_executor(args))
    overrides = dict(parse_assignment(a) for a in args.set)
    try:
        parent = _parent(args, study, at_epochs)
        result = study.sweep(parent, at_epochs, grid=grid, overrides=[overrides], seeds=seeds, epochs=args.epochs,
                             progress=print_progress)
    except (ValueError, KeyError) as e:
        raise UserError(str(e).strip("'\"")) from e
    for spec in result.specs:
        status = result.status[spec.id]
        run = result.run_ids.get(spec.id)
        line = f"{spec.id}  {spec.label():40s}  {status}" + (f"  run {run}" if run is not None else "")
        if status == "failed":
            line += "  error: " + (result.errors.get(spec.id) or "").strip().splitlines()[-1][:200]
        print(line)
    summary = result.summary()
    print(", ".join(f"{n} {s}" for s, n in sorted(summary.items())) + f"; trained {result.trained}")
    return 1 if summary.get("failed") else 0


def _epochs(text: str) -> list[int]:
    from .cli import UserError

    try:
        values = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--at-epoch takes integers (a comma list), got {text!r}") from None
    if not values or min(values) < 0:
        raise UserError(f"--at-epoch takes epochs >= 0, got {text!r}")
    return values


def cmd_branch(args: argparse.Namespace) -> int:
    return _run(args, _epochs(args.at_epoch), None, [args.seed])


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..studies.spec import parse_value
    from .cli import UserError

    grid: dict[str, list[Any]] = {}
    for axis in args.grid:
        key, sep, values = axis.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--grid is KEY=V1,V2,..., got {axis!r}")
        parts = values.split(";") if ";" in values else values.split(",")
        grid[key.strip()] = [parse_value(v) for v in parts if v.strip()]
    if "," in args.seeds:
        seeds: Any = [int(s) for s in args.seeds.split(",") if s.strip()]
    else:
        try:
            seeds = int(args.seeds)
        except ValueError:
            raise UserError(f"--seeds is a count or a comma list, got {args.seeds!r}") from None
    return _run(args, _epochs(args.at_epoch), grid or None, seeds)


def cmd_study_report(args: argparse.Namespace) -> int:
    from ..analysis.branches import write_branch_report

    out = args.out or args.store.with_name(args.store.stem + "-study.html")
    write_branch_report(args.store, out, metric=args.metric)
    print(f"study report written to {out}")
    return 0


def cmd_runs_tree(args: argparse.Namespace) -> int:
    """``runs STORE --tree``: the provenance tree (parent, branch epoch, overrides, status)."""
    from ..analysis.branches import branch_tree, format_tree
    from .cli import open_store

    store = open_store(args.store)
    try:
        tree = branch_tree(store)
    finally:
        store.close()
    print(format_tree(tree) if len(tree) else f"{args.store}: no runs")
    return 0


__all__ = ["add_study_commands", "cmd_train", "cmd_branch", "cmd_sweep", "cmd_study_report", "cmd_runs_tree"]
