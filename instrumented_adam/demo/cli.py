"""The ``instrumented-adam`` command line.

    instrumented-adam demo                         train the built-in tasks, record them, write the report
    instrumented-adam report STORE [RUN ...]       self-contained HTML report of runs in a store
    instrumented-adam runs STORE                   list the runs of a store
    instrumented-adam export STORE [RUN] --format tensorboard|csv|parquet --out DIR
    instrumented-adam check STORE [RUN ...]        health findings; exit 1 when a run is unhealthy
    instrumented-adam train|branch|sweep|study-report  branching studies (see `demo.study_cli`)
    instrumented-adam runs STORE --tree            the provenance tree of runs and branches
    instrumented-adam study lr-rules [--tasks linreg,digits] [--seeds 5]   the learning-rate rules study

`--help`, `--version`, `runs` and `check` never import torch: only `demo` needs it (its options'
choices come from the tasks module, which is loaded only when the command is `demo`).

User errors (a missing store, an unknown run, a bad option) print one line on stderr and exit
with a non-zero status, without a traceback: 2 for command-line usage errors (argparse's
convention), 1 for anything else that went wrong, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

PROG = "instrumented-adam"

#: Exit statuses.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

DEFAULT_DEMO_DIR = Path("runs") / "demo"
DEMO_STORE_NAME = "demo.sqlite"
DEMO_REPORT_NAME = "report.html"


class UserError(Exception):
    """An error caused by what the user asked for: reported as one line, no traceback."""


# ---- argument types (argparse turns their ValueError/ArgumentTypeError into a usage error) ----
def _number(kind: Callable[[str], Any], check: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(value, float) and not math.isfinite(value) or not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_float = _number(float, lambda v: v > 0, "a positive number")
nonnegative_float = _number(float, lambda v: v >= 0, "a number >= 0")
positive_int = _number(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
beta = _number(float, lambda v: 0 <= v < 1, "a beta in [0, 1)")


def _version() -> str:
    from .. import __version__  # the lazy top-level package: no torch

    return __version__


def build_parser(demo_options: bool = True) -> argparse.ArgumentParser:
    """The argument parser of the ``instrumented-adam`` command.

    `demo_options`: add the demo's options, whose choices come from the tasks module (which
    imports torch). `main` passes False unless the command is ``demo``, so that ``--help``,
    ``--version``, ``runs`` and ``check`` stay fast and torch-free.
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Instrumented Adam/AdamW/Adamax: train the demo, and report, list, check or export recorded runs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="train the built-in tasks with the instrumented optimizer, record them and write the report",
        description=(
            "Trains the built-in tasks (linreg: 2-parameter linear regression whose whole path is drawn on "
            "its loss surface; digits: the 75-50-25 MLP on scikit-learn's bundled digits) with each chosen "
            "optimizer, records every step and epoch into a SQLite store, prints a statistics table per "
            "epoch and writes an HTML report. Settings left out take each task's defaults."
        ),
    )
    demo.set_defaults(handler=cmd_demo)
    if demo_options:
        _add_demo_options(demo)

    _add_store_commands(sub)
    from .study_cli import add_study_commands  # train, branch, sweep, study-report (issue 13)

    add_study_commands(sub)
    _add_study_commands(sub)
    return parser


def _add_histogram_option(demo: argparse.ArgumentParser) -> None:
    """The kernel histograms of the demo's runs (issue 11: distributions from the kernel)."""
    demo.add_argument("--histogram-every", type=nonnegative_int, default=10, metavar="N",
                      help="the optimizer's per-tensor log2 histograms of |g|, |Δθ| and the effective step size "
                           "every N steps, shown in the report (0: none; default: 10)")


def _add_classic_options(demo: argparse.ArgumentParser) -> None:
    """Options of the classic optimizers (SGD, RMSprop, Adagrad); the Adam family ignores them."""
    demo.add_argument("--momentum", type=nonnegative_float,
                      help="momentum of sgd and rmsprop (default: sgd 0.9, rmsprop 0)")
    demo.add_argument("--nesterov", action="store_true", help="Nesterov momentum (sgd)")


def _optimizer_summary(config: Any) -> str:
    """The optimizer's own hyperparameters, for the run's header line."""
    if config.optimizer == "sgd":
        return f"momentum={config.momentum or 0:g}" + (" nesterov" if config.nesterov else "")
    if config.optimizer == "rmsprop":
        return f"momentum={config.momentum or 0:g} eps={config.eps:g}"
    if config.optimizer == "adagrad":
        return "eps=1e-10"
    return f"betas=({config.betas[0]:g}, {config.betas[1]:g}) eps={config.eps:g}"


def _add_demo_options(demo: argparse.ArgumentParser) -> None:
    from .tasks import ACTIVATIONS, OPTIMIZERS, SCHEDULES, TASKS

    _add_histogram_option(demo)
    demo.add_argument("--task", nargs="+", choices=[*TASKS, "all"], default=["all"], help="tasks to run (default: all)")
    demo.add_argument("--optimizer", nargs="+", choices=list(OPTIMIZERS), default=["adam", "adamax"],
                      help="optimizers, one run per task each (default: adam adamax); the report overlays the "
                           "runs of one task")
    demo.add_argument("--epochs", type=positive_int, help="epochs per run (default: linreg 100, digits 30)")
    demo.add_argument("--lr", type=positive_float, help="learning rate (default: linreg 0.1; digits 1e-3, Adamax 2e-3)")
    demo.add_argument("--weight-decay", type=nonnegative_float, help="weight decay (default: AdamW 1e-2, others 0)")
    _add_classic_options(demo)
    demo.add_argument("--betas", type=beta, nargs=2, metavar=("BETA1", "BETA2"), default=(0.9, 0.999), help="default: 0.9 0.999")
    demo.add_argument("--eps", type=positive_float, default=1e-8, help="default: 1e-8")
    demo.add_argument("--batch-size", type=positive_int, help="default: 32")
    demo.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                      help="lr schedule, per epoch: cosine (to 1%% of the lr) or constant (default: cosine)")
    demo.add_argument("--activation", choices=list(ACTIVATIONS), default="tanh", help="digits MLP activation (default: tanh)")
    demo.add_argument("--seed", type=nonnegative_int, default=0, help="seed of data, initialisation and batch order (default: 0)")
    demo.add_argument("--out", type=Path, default=DEFAULT_DEMO_DIR,
                      help=f"output directory for {DEMO_STORE_NAME} and {DEMO_REPORT_NAME} (default: ./{DEFAULT_DEMO_DIR})")
    demo.add_argument("--no-report", action="store_true", help="record the runs but do not write the report")
    demo.add_argument("--print-every", type=positive_int,
                      help="print every N-th epoch's statistics (default: every epoch up to 30 epochs, else about 20 rows)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--threads", type=positive_int, default=1,
                      help="torch CPU threads (default: 1 — the demo's tensors are too small to gain from more)")


def _lag_range(text: str) -> tuple[int, int]:
    """'3' → (0, 3); '1-5' or '1:5' → (1, 5)."""
    parts = text.replace(":", "-").split("-")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a lag or a lag range like 1-5") from None
    if len(values) == 1:
        values = [0, values[0]]
    if len(values) != 2 or values[0] < 0 or values[1] < values[0]:
        raise argparse.ArgumentTypeError(f"{text!r} is not a lag or a lag range like 1-5 (0 <= first <= last)")
    return values[0], values[1]


def _epoch_window(text: str) -> tuple[int | None, int | None]:
    """'100-' (from 100), '-500' (up to 500), '100-500' (inclusive)."""
    first, sep, last = text.partition("-")
    try:
        window = (int(first) if first else None, int(last) if last else None)
    except ValueError:
        window = None
    if not sep or window is None or window == (None, None) or (None not in window and window[1] < window[0]):
        raise argparse.ArgumentTypeError(f"{text!r} is not an epoch window like 100-500, 100- or -500")
    return window


def _add_store_commands(sub) -> None:
    report = sub.add_parser("report", help="write a self-contained HTML report of runs in a store",
                            description="Writes one HTML file (figures embedded, readable offline) for the given runs "
                                        "(all runs of the store when none is given), overlaid per task.")
    report.add_argument("store", type=Path, help="the run store (.sqlite)")
    report.add_argument("runs", nargs="*", metavar="RUN", help="run names or ids (default: all runs)")
    report.add_argument("--out", type=Path, help="the HTML file (default: the store's path with .html)")
    report.add_argument("--title", help="page title")
    report.add_argument("--max-lag", type=nonnegative_int, default=None,
                        help="largest lag (epochs) of the loss relations (default: 3; --lags sets a range)")
    report.add_argument("--lags", type=_lag_range, default=None, metavar="FIRST-LAST",
                        help="lags (epochs) of the loss relations: a figure at epoch k against the target at k+lag "
                             "(default: 0-3)")
    report.add_argument("--target", choices=["val", "train", "both"], default="val",
                        help="the loss whose change the relations predict (default: val, the validation loss)")
    report.add_argument("--epochs", type=_epoch_window, default=None, metavar="FIRST-LAST",
                        help="epoch window of the relations, inclusive: 100-500, 100- or -500 (default: all)")
    report.add_argument("--layer-norm", choices=["raw", "rms"], default="rms",
                        help="per-layer heatmap of the raw epoch step norm ‖s_k‖, or its per-element RMS "
                             "‖s_k‖/√numel, which does not rank tensors by size (default: rms)")
    report.add_argument("--top", type=positive_int, default=15, help="rows of each ranked relation table (default: 15)")
    report.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    report.set_defaults(handler=cmd_report)

    runs = sub.add_parser("runs", help="list the runs of a store",
                          description="Lists the runs of a store: status, optimizer, task, epochs and steps each ran, "
                                      "lineage (parent run and branch epoch) and start time.")
    runs.add_argument("store", type=Path, help="the run store (.sqlite)")
    runs.add_argument("--tree", action="store_true",
                      help="print the provenance tree: each run's branches (branch epoch, overrides, status) under it")
    runs.set_defaults(handler=cmd_runs)

    check = sub.add_parser("check", help="print the health findings of runs; exit 1 when one is unhealthy",
                           description="Diagnoses runs from the store (usable while they train): non-finite loss, "
                                       "gradients or parameters, divergence, loss spikes, plateaus, overfitting, the "
                                       "best epoch, steps skipped by a GradScaler and layers that stopped moving. "
                                       "Exits 1 when a run has an error-level finding (with --strict: any warning), "
                                       "so that a job script or CI can stop on it.")
    check.add_argument("store", type=Path, help="the run store (.sqlite)")
    check.add_argument("runs", nargs="*", metavar="RUN", help="run names or ids (default: all runs)")
    check.add_argument("--strict", action="store_true", help="also exit 1 on warnings (overfitting, plateau, spikes, ...)")
    check.set_defaults(handler=cmd_check)

    export = sub.add_parser("export", help="export runs as TensorBoard event files, CSV or Parquet",
                            description="Writes the runs' step, epoch, per-layer and metric tables as TensorBoard event "
                                        "files (one directory per run), CSV or Parquet files (one per table) into "
                                        "--out; docs/data-dictionary.md describes every column.")
    export.add_argument("store", type=Path, help="the run store (.sqlite)")
    export.add_argument("run", nargs="?", help="run name or id (default: all runs)")
    export.add_argument("--format", required=True, choices=["tensorboard", "csv", "parquet"], dest="fmt",
                        help="tensorboard (event files for TensorBoard), csv or parquet (needs pyarrow)")
    export.add_argument("--out", type=Path, required=True, help="output directory")
    export.set_defaults(handler=cmd_export)


# ---- study lr-rules (issue 14) ---------------------------------------------------------------
DEFAULT_STUDY_DIR = Path("runs") / "study-lr-rules"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _task_value(text: str) -> tuple[str, float]:
    task, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not task or not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not TASK=VALUE with a positive VALUE")
    return task, number


def _add_study_commands(sub) -> None:
    study = sub.add_parser("study", help="run a study (lr-rules: the learning-rate rules against the baselines)",
                           description="Runs a study and writes its report (Markdown tables, JSON, a PNG) and a run "
                                       "store of its instrumented runs.")
    kinds = study.add_subparsers(dest="study", metavar="STUDY")
    kinds.required = True
    lr = kinds.add_parser("lr-rules", help="every learning-rate rule and baseline on every task and seed",
                          description="Trains each task with Adam at its default lr under every rule and baseline "
                                      "(constant, exp-decay, plateau, aligned, careful, careful-rollback, "
                                      "extrapolation, hypergradient, eve-kh, prodigy) for each seed, and reports "
                                      "epochs and seconds to a target validation loss, final and best validation "
                                      "loss with bootstrap CIs over seeds, the lr trajectories and the decisions.")
    lr.add_argument("--tasks", type=_csv, default=["linreg", "digits"], help="comma-separated (default: linreg,digits)")
    lr.add_argument("--seeds", type=positive_int, default=5, help="seeds 0..N-1 (default: 5)")
    lr.add_argument("--methods", type=_csv, default=None, help="comma-separated subset of the methods (default: all)")
    lr.add_argument("--epochs", type=_task_value, action="append", default=[], metavar="TASK=N",
                    help="epochs of a task (repeatable; default: the task's)")
    lr.add_argument("--target", type=_task_value, action="append", default=[], metavar="TASK=LOSS",
                    help="target validation loss of a task (repeatable; default: per seed, 1.1 × the constant-lr run's best)")
    lr.add_argument("--out", type=Path, default=DEFAULT_STUDY_DIR, help=f"output directory (default: ./{DEFAULT_STUDY_DIR})")
    lr.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default: 1)")
    lr.set_defaults(handler=cmd_study_lr_rules)


def cmd_study_lr_rules(args: argparse.Namespace) -> int:
    """The lr-rules study: jobs through the local loop (see `demo.lr_study.run_study` for executors)."""
    import platform

    import torch

    from .. import __version__
    from . import lr_study

    methods = args.methods or list(lr_study.METHODS)
    try:
        epochs = {t: int(n) for t, n in args.epochs}
        lr_study.study_jobs(args.tasks, range(args.seeds), methods, epochs=epochs)  # validates names
    except ValueError as e:
        raise UserError(str(e)) from None
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "study.sqlite"
    if store.exists():
        raise UserError(f"{store} exists: choose another --out or remove it")
    start = time.time()

    def progress(i: int, n: int, job) -> None:
        print(f"[{i + 1}/{n}] {job.task} {job.method} seed {job.seed} ({time.time() - start:.0f} s)", file=sys.stderr)

    results = lr_study.run_study(args.tasks, range(args.seeds), methods, epochs=epochs, store=store,
                                 threads=args.threads, progress=progress)
    header = (f"instrumented_adam {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
              f"{platform.processor() or platform.machine()}, {args.threads} thread(s); "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {len(results)} runs in {time.time() - start:.0f} s")
    md = lr_study.write_study_report(results, args.out, targets=dict(args.target), header=header)
    print(md.read_text())
    print(f"report: {md}  (runs recorded in {store})")
    return EXIT_OK


# ---- helpers ---------------------------------------------------------------------------------
def open_store(path: Path):
    """Opens an existing store, with a user-facing message when it is missing or not a store."""
    from ..telemetry.store import RunStore, StoreError

    if not path.exists():
        raise UserError(f"no run store at {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a run store (give the .sqlite file)")
    try:
        return RunStore(path)
    except StoreError as e:
        raise UserError(str(e)) from None


def _resolve_runs(store, runs: Sequence[str]) -> list[int]:
    from ..telemetry.store import UnknownRunError

    ids = []
    for run in runs:
        try:
            ids.append(store.run_id(run))
        except UnknownRunError as e:
            raise UserError(str(e)) from None
    return ids


def _fmt(value: Any, spec: str = ".4g") -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if not math.isfinite(value) else format(value, spec)


#: The per-epoch statistics table of the demo: (header, epoch-row key, format).
EPOCH_TABLE: tuple[tuple[str, str, str], ...] = (
    ("epoch", "epoch", "d"),
    ("train_loss", "train_loss", ".4g"),
    ("val_loss", "val_loss", ".4g"),
    ("val_acc", "val_accuracy", ".4f"),
    ("lr", "lr", ".3g"),
    ("step_norm", "step_norm", ".3g"),
    ("cos_prev", "cos_prev", "+.3f"),
    ("upd/param", "update_to_param_mean", ".3g"),
    ("eff_lr", "eff_lr_mean_mean", ".3g"),
)
_WIDTHS = (5, 10, 10, 7, 9, 10, 8, 10, 9)


def epoch_table_header(with_accuracy: bool) -> str:
    """Header line of the demo's statistics table."""
    cells = [h.rjust(w) for (h, key, _), w in zip(EPOCH_TABLE, _WIDTHS, strict=True) if with_accuracy or key != "val_accuracy"]
    return "  ".join(cells)


def epoch_table_row(row: dict[str, Any], with_accuracy: bool) -> str:
    """One epoch's line of the demo's statistics table (from `Recorder.end_epoch`'s row)."""
    cells = []
    for (_, key, spec), width in zip(EPOCH_TABLE, _WIDTHS, strict=True):
        if key == "val_accuracy" and not with_accuracy:
            continue
        value = row.get(key)
        text = str(int(value)) if spec == "d" and value is not None else _fmt(value, spec)
        cells.append(text.rjust(width))
    return "  ".join(cells)


def _print_every(epochs: int, chosen: int | None) -> int:
    if chosen is not None:
        return chosen
    return 1 if epochs <= 30 else math.ceil(epochs / 20)


# ---- commands --------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """Trains the chosen tasks × optimizers, prints the per-epoch table, writes the report."""
    import torch
    from tqdm import tqdm

    from ..telemetry.store import RunStore
    from .tasks import DEFAULT_DEMO_TASKS, TASKS, TrainConfig, least_squares, steps_per_epoch

    task_names = list(DEFAULT_DEMO_TASKS) if "all" in args.task else list(dict.fromkeys(args.task))
    if "digits" in task_names and importlib.util.find_spec("sklearn") is None:
        raise UserError("the digits task needs scikit-learn (its bundled digits data): pip install scikit-learn, "
                        "or run --task linreg")
    optimizers = list(dict.fromkeys(args.optimizer))
    configs = []
    for name in optimizers:
        try:
            configs.append(TrainConfig(
                optimizer=name, lr=args.lr, weight_decay=args.weight_decay, betas=tuple(args.betas), eps=args.eps,
                epochs=args.epochs, batch_size=args.batch_size, schedule=args.schedule, seed=args.seed,
                activation=args.activation, histogram_every=args.histogram_every,
                momentum=args.momentum, nesterov=args.nesterov,
            ))
        except ValueError as e:
            raise UserError(str(e)) from None
    out_dir: Path = args.out
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    store_path = out_dir / DEMO_STORE_NAME
    store = RunStore(store_path, create=True)
    before = len(store.runs())
    if before:
        print(f"Appending to {store_path} ({before} earlier run(s) kept; the report shows this demo's runs).")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    run_ids: list[int] = []
    started = time.perf_counter()
    try:
        for task_name in task_names:
            task = TASKS[task_name]
            for base in configs:
                config = task.resolve(base)
                run_ids.append(_demo_run(task, config, store, args, tqdm, steps_per_epoch(task, config)))
    finally:
        torch.set_num_threads(threads)
    train_time = time.perf_counter() - started
    print()
    print(f"Trained {len(run_ids)} run(s) in {train_time:.1f} s; store: {store_path.resolve()}")
    for run_id in run_ids:
        print("  " + _final_line(store, run_id, least_squares))
    from ..analysis import health

    worrying = [h for h in health.check_runs(store, run_ids) if h.worst() in ("error", "warning")]
    for h in worrying:  # the same findings the report opens with; `check` prints them all
        print(h.text())
    if args.no_report:
        store.close()
        print(f"Report skipped (--no-report); write it with: {PROG} report {store_path}")
        return EXIT_OK
    from ..analysis.report import write_report

    started = time.perf_counter()
    report_path = write_report(store, out_dir / DEMO_REPORT_NAME, runs=run_ids, title="instrumented_adam demo")
    store.close()
    print(f"Report written in {time.perf_counter() - started:.1f} s: {report_path.resolve()}")
    print(f"Open it in a browser (file://{report_path.resolve()}); docs/report.md explains the figures.")
    return EXIT_OK


def _demo_run(task, config, store, args: argparse.Namespace, tqdm, steps_per_epoch: int) -> int:
    from .tasks import train_task

    with_accuracy = task.name == "digits"
    every = _print_every(config.epochs, args.print_every)
    label = f"{task.name}-{config.optimizer}"
    print()
    print(f"== {label}: {task.description}")
    print(f"   {config.optimizer} lr={config.lr:g} {_optimizer_summary(config)} "
          f"weight_decay={config.weight_decay:g}, {config.schedule} schedule, {config.epochs} epochs x "
          f"{steps_per_epoch} steps (batch {config.batch_size}), seed {config.seed}"
          + (f"; every {every} epochs printed" if every > 1 else ""))
    print(epoch_table_header(with_accuracy))
    bar = tqdm(total=config.epochs * steps_per_epoch, desc=label, unit="step", leave=False, disable=args.no_progress,
               dynamic_ncols=True, file=sys.stderr)

    def on_epoch(row: dict[str, Any]) -> None:
        epoch = int(row["epoch"])
        if epoch % every == 0 or epoch == config.epochs - 1:
            bar.write(epoch_table_row(row, with_accuracy), file=sys.stdout)
        bar.set_postfix(train_loss=_fmt(row.get("train_loss"), ".3g"), refresh=False)

    try:
        result = train_task(task, config, store, run_name=label, on_epoch=on_epoch, on_step=bar.update)
    finally:
        bar.close()
    return result.run_id


def _final_line(store, run_id: int, least_squares) -> str:
    from .tasks import LOSS_SURFACE_KEY

    info = store.run_info(run_id)
    epochs = store.epochs(run_id)
    last = epochs.iloc[-1]
    text = f"run {run_id} {info['name']}: train loss {_fmt(last.get('train_loss'))}, val loss {_fmt(last.get('val_loss'))}"
    if "val_accuracy" in epochs:
        text += f", val accuracy {_fmt(last['val_accuracy'], '.2%')}"
    surface = (info.get("hyperparameters") or {}).get(LOSS_SURFACE_KEY)
    if surface and all(p in epochs for p in surface["params"]):
        got = [float(last[p]) for p in surface["params"]]
        opt = surface["optimum"]
        text += (f", (slope, intercept) = ({got[0]:.4f}, {got[1]:.4f}) vs least squares ({opt[0]:.4f}, {opt[1]:.4f})")
    return text


def cmd_report(args: argparse.Namespace) -> int:
    """Writes the HTML report of runs in a store."""
    from ..analysis.report import write_report

    store = open_store(args.store)
    try:
        ids = _resolve_runs(store, args.runs)
        out = args.out or args.store.with_suffix(".html")
        if out.exists() and out.is_dir():
            raise UserError(f"--out {out} is a directory; give the HTML file's path")
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: the directory {out.parent} does not exist")
        if args.lags is not None and args.max_lag is not None:
            raise UserError("give --lags or --max-lag, not both")
        lags = args.lags or (0, 3 if args.max_lag is None else args.max_lag)
        started = time.perf_counter()
        path = write_report(store, out, runs=ids, title=args.title, lags=lags, target=args.target, window=args.epochs,
                            layer_norm=args.layer_norm, top=args.top, progress=not args.no_progress)
    finally:
        store.close()
    count = len(ids) if ids else "all"
    print(f"Report of {count} run(s) written in {time.perf_counter() - started:.1f} s: {path.resolve()}")
    return EXIT_OK


def cmd_runs(args: argparse.Namespace) -> int:
    """Lists the runs of a store."""
    import pandas as pd

    if getattr(args, "tree", False):
        from .study_cli import cmd_runs_tree

        return cmd_runs_tree(args)

    store = open_store(args.store)
    try:
        runs = store.runs()
        if runs.empty:
            print(f"{args.store}: no runs")
            return EXIT_OK
        epochs = store.epochs(with_metrics=False)
        # Steps the run itself ran: a branch starts counting at its branch step, not at 0.
        counts = epochs.groupby("run_id").agg(epochs=("epoch", "size"), steps=("step", "max"))
        if "branch_step" in runs:
            start = runs.set_index("run_id")["branch_step"].reindex(counts.index)
            counts["steps"] = counts["steps"] - pd.to_numeric(start, errors="coerce").fillna(0)
    finally:
        store.close()
    table = runs[["run_id", "name", "status", "optimizer", "seed", "parent_run", "branch_epoch", "started_at"]].copy()
    table = table.join(counts, on="run_id")
    table["epochs"] = table["epochs"].fillna(0).astype(int)
    table["steps"] = table["steps"].fillna(0).astype(int)
    table["task"] = runs["hyperparameters"].map(lambda h: (h or {}).get("task", "") if isinstance(h, dict) else "")
    table["started_at"] = table["started_at"].str.slice(0, 19).str.replace("T", " ")
    columns = ["run_id", "name", "status", "optimizer", "task", "epochs", "steps", "seed", "parent_run", "branch_epoch",
               "started_at"]
    table = table[columns]
    for col in ("seed", "parent_run", "branch_epoch"):  # nullable integers: '-' rather than <NA>
        table[col] = [("-" if pd.isna(v) else str(int(v))) for v in table[col]]
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 10_000):
        print(table.to_string(index=False, na_rep="-"))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Prints the health findings of runs; EXIT_ERROR when one is unhealthy."""
    from ..analysis import health

    store = open_store(args.store)
    try:
        ids = _resolve_runs(store, args.runs)
        results = health.check_runs(store, ids)
    finally:
        store.close()
    if not results:
        print(f"{args.store}: no runs")
        return EXIT_OK
    for result in results:
        print(result.text())
    failing = [r for r in results if not r.healthy or (args.strict and r.worst() == "warning")]
    return EXIT_ERROR if failing else EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Exports runs with the functions of `instrumented_adam.export`."""
    from ..telemetry import export

    store = open_store(args.store)
    try:
        run = _resolve_runs(store, [args.run])[0] if args.run is not None else None
        if args.out.exists() and not args.out.is_dir():
            raise UserError(f"--out {args.out} exists and is not a directory")
        try:
            if args.fmt == "tensorboard":
                written = [str(p) for p in export.to_tensorboard(store, args.out, run)]
            elif args.fmt == "csv":
                written = [str(p) for p in export.to_csv(store, args.out, run).values()]
            else:
                written = [str(p) for p in export.to_parquet(store, args.out, run).values()]
        except ImportError as e:
            package = {"tensorboard": "tensorboard", "parquet": "pyarrow"}.get(args.fmt, e.name or "?")
            raise UserError(f"exporting {args.fmt} needs {package}: pip install {package} ({e})") from None
    finally:
        store.close()
    print(f"Exported {'run ' + str(run) if run is not None else 'all runs'} as {args.fmt} to {args.out.resolve()}:")
    for path in written:
        print(f"  {path}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``instrumented-adam`` console script; returns the exit status."""

    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(demo_options=command == "demo")
    args = parser.parse_args(argv)  # usage errors: message + SystemExit(2), argparse's convention
    from ..telemetry.store import StoreError  # after parsing: --help and --version need no pandas

    try:
        return int(args.handler(args))
    except (UserError, StoreError) as e:  # StoreError: e.g. a store written by a newer version
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `instrumented-adam runs STORE | head`: the reader left
        # Python would report the failed flush of stdout at exit: point stdout at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":  # python -m instrumented_adam.cli
    sys.exit(main())
