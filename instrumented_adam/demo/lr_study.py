"""The learning-rate rules study: every rule and baseline on every task and seed, with CIs.

    instrumented-adam study lr-rules --tasks linreg,digits --seeds 5

Each (task, method, seed) is one job: the task's data, model and minibatch order from the seed,
Adam at the task's default lr, and the method's rule (or a torch scheduler, or an lr-free
optimizer from PyPI run as is). Instrumented runs are recorded into one run store (the rules'
decisions included, so `instrumented-adam report` shows them); each job also returns its
per-epoch validation loss, lr and wall time, from which `summarize` computes, per task and
method: epochs and seconds to reach the target validation loss, final and best validation loss,
each with a percentile bootstrap CI over seeds, and the lr trajectories. `write_study_report`
writes them as Markdown (+ JSON and a PNG of the trajectories).

The jobs run through `run_study(..., map_jobs=...)`: by default a local loop in this process
(`local_map`). Any executor with the same contract — ``map_jobs(run_job, jobs)`` returning the
results in the jobs' order — can run them instead (each job then needs its own store path: give
`StudyJob.store` per job), e.g. the studies layer's executor once it has landed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..core import lr_rules
from ..core import optimizer as _optim
from ..telemetry.recorder import Recorder
from .tasks import TASKS, TrainConfig

#: The methods of the study: name -> what it is (the rule parameters are in `_make_method`).
METHODS: dict[str, str] = {
    "constant": "Adam at the task's default lr, no rule (the reference)",
    "exp-decay": "torch ExponentialLR, lr × 0.1 over the run",
    "plateau": "torch ReduceLROnPlateau on the validation loss (factor 0.5, patience 3)",
    "aligned": "AlignedEpochLR: ×1.2 while cos(s_k, s_k−1) > 0.5, ×0.5 below 0",
    "careful": "CarefulLR on the validation loss: ×0.5 on a rise, ×1.05 after 3 improvements",
    "careful-rollback": "CarefulLR as above, rolling back to the last accepted epoch",
    "extrapolation": "EpochExtrapolation (the talk's EVE): probe α ∈ {0.25..4} along s_k, jump to the best",
    "hypergradient": "HypergradientLR (Baydin et al. 2018), multiplicative, β = 0.02, per step",
    "eve-kh": "EveLR (Koushik & Hayashi 2016), β3 = 0.999, per step",
    "prodigy": "prodigyopt.Prodigy(lr=1.0), learning-rate free, run as is (not instrumented)",
}

#: Size of the fixed probe set of EpochExtrapolation (training examples, drawn once per seed).
PROBE_SIZE = 512


@dataclass(frozen=True)
class StudyJob:
    """One training run of the study."""

    task: str
    method: str
    seed: int
    epochs: int | None = None  # None: the task's default
    store: str | None = None  # the run store to record into (None: not recorded)


@dataclass
class JobResult:
    """What a job returns: per-epoch series (epoch k at index k) and the run's id in the store."""

    task: str
    method: str
    seed: int
    val_loss: list[float]
    train_loss: list[float]
    lr: list[float]  # the lr in force during each epoch (group 0; Prodigy: d·lr)
    wall: list[float]  # seconds since the start of the run at each epoch end (evaluation included)
    run_id: int | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    probe_evaluations: int = 0


def _make_method(method: str, opt: torch.optim.Optimizer, epochs: int, probe: Callable[[], torch.Tensor]) -> Any:
    lr0 = float(opt.param_groups[0]["lr"])
    bounds = dict(min_lr=lr0 * 1e-3, max_lr=lr0 * 1e2)
    if method == "exp-decay":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.1 ** (1.0 / epochs))
    if method == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=3)
    if method == "aligned":
        return lr_rules.AlignedEpochLR(opt, up=1.2, down=0.5, high=0.5, low=0.0, **bounds)
    if method in ("careful", "careful-rollback"):
        return lr_rules.CarefulLR(opt, factor=0.5, grow=1.05, patience=3, rollback=method == "careful-rollback",
                                  **bounds)
    if method == "extrapolation":
        return lr_rules.EpochExtrapolation(opt, probe, **bounds)
    if method == "hypergradient":
        return lr_rules.HypergradientLR(opt, hyper_lr=0.02, **bounds)
    if method == "eve-kh":
        return lr_rules.EveLR(opt, **bounds)
    return None


def run_job(job: StudyJob) -> JobResult:
    """Trains one (task, method, seed); records it in `job.store` when the optimizer is instrumented."""
    if job.method not in METHODS:
        raise ValueError(f"unknown method {job.method!r}; choose from {', '.join(METHODS)}")
    task = TASKS[job.task]
    config = task.resolve(TrainConfig(optimizer="adam", seed=job.seed, epochs=job.epochs, schedule="constant"))
    torch.manual_seed(config.seed)
    data = task.data(config.seed)
    model = task.model(config, data)
    probe_idx = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(10_000 + job.seed))[:PROBE_SIZE]
    x_probe, y_probe = data.x_train[probe_idx], data.y_train[probe_idx]

    def probe() -> torch.Tensor:
        return task.loss(model(x_probe), y_probe)

    if job.method == "prodigy":
        from prodigyopt import Prodigy  # the lr-free baseline, from PyPI, run as is

        opt: torch.optim.Optimizer = Prodigy(model.parameters(), lr=1.0)
    else:
        opt = _optim.Adam(model.parameters(), lr=config.lr, betas=config.betas, eps=config.eps)
    rule = _make_method(job.method, opt, config.epochs, probe)
    rec = None
    if job.store is not None and job.method != "prodigy":
        rec = Recorder(opt, job.store, run_name=f"{job.task}-{job.method}-s{job.seed}", model=model, seed=job.seed,
                       hyperparameters={"task": task.name, "study": "lr-rules", "method": job.method,
                                        **asdict(config)})
        if isinstance(rule, lr_rules.LRRule):
            rec.add_lr_rule(rule)
    per_step = isinstance(rule, lr_rules.LRRule) and rule.per_step
    generator = torch.Generator().manual_seed(config.seed)
    n = len(data.x_train)
    result = JobResult(job.task, job.method, job.seed, [], [], [], [])
    start = time.perf_counter()
    try:
        model.train()
        for _ in range(config.epochs):
            group = opt.param_groups[0]
            order = torch.randperm(n, generator=generator)
            for lo in range(0, n, config.batch_size):
                idx = order[lo : lo + config.batch_size]
                loss = task.loss(model(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if per_step:
                    rule.step(loss.detach()) if isinstance(rule, lr_rules.EveLR) else rule.step()
            lr_in_force = float(group["lr"]) * float(group.get("d", 1.0))  # Prodigy's step size is d·lr
            metrics = task.evaluate(model, data)
            row = rec.end_epoch(**metrics) if rec is not None else None
            if rec is None and hasattr(opt, "end_epoch"):
                row = opt.end_epoch()
            if isinstance(rule, lr_rules.AlignedEpochLR):
                rule.step(row)
            elif isinstance(rule, lr_rules.CarefulLR):
                rule.step(metrics["val_loss"])
            elif isinstance(rule, lr_rules.EpochExtrapolation):
                rule.step()
            elif isinstance(rule, torch.optim.lr_scheduler.ReduceLROnPlateau):
                rule.step(metrics["val_loss"])
            elif rule is not None and not per_step:
                rule.step()
            result.val_loss.append(metrics["val_loss"])
            result.train_loss.append(metrics["train_loss"])
            result.lr.append(lr_in_force)
            result.wall.append(time.perf_counter() - start)
    except BaseException:
        if rec is not None:
            rec.close("failed")
        raise
    if isinstance(rule, lr_rules.EpochExtrapolation):
        result.probe_evaluations = rule.probe_evaluations
    if rec is not None:
        rec.close()
        result.run_id = rec.run_id
        result.decisions = _read_decisions(job.store, rec.run_id)  # as the store holds them
    elif isinstance(rule, lr_rules.LRRule):
        result.decisions = [d.to_dict() for d in rule.pop_decisions()]
    return result


def _read_decisions(store: str, run_id: int) -> list[dict[str, Any]]:
    from ..telemetry.store import RunStore

    with RunStore(store, readonly=True) as s:
        return s.lr_decisions(run_id).drop(columns=["run_id"]).to_dict("records")


def local_map(fn: Callable[[StudyJob], JobResult], jobs: Sequence[StudyJob],
              progress: Callable[[int, int, StudyJob], None] | None = None) -> list[JobResult]:
    """The default executor: the jobs one after another in this process."""
    out = []
    for i, job in enumerate(jobs):
        if progress is not None:
            progress(i, len(jobs), job)
        out.append(fn(job))
    return out


def study_jobs(tasks: Sequence[str], seeds: Sequence[int], methods: Sequence[str] = tuple(METHODS), *,
               epochs: Mapping[str, int] | None = None, store: str | Path | None = None) -> list[StudyJob]:
    """Every (task, method, seed) of the study."""
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    return [StudyJob(t, m, s, (epochs or {}).get(t), str(store) if store is not None else None)
            for t in tasks for m in methods for s in seeds]


def run_study(tasks: Sequence[str], seeds: Sequence[int], methods: Sequence[str] = tuple(METHODS), *,
              epochs: Mapping[str, int] | None = None, store: str | Path | None = None,
              map_jobs: Callable[..., list[JobResult]] | None = None, threads: int = 1,
              progress: Callable[[int, int, StudyJob], None] | None = None) -> list[JobResult]:
    """Runs the study's jobs through `map_jobs` (default `local_map`) and returns their results."""
    torch.set_num_threads(threads)
    jobs = study_jobs(tasks, seeds, methods, epochs=epochs, store=store)
    if map_jobs is None:
        return local_map(run_job, jobs, progress)
    return map_jobs(run_job, jobs)


# ---- statistics ----------------------------------------------------------------------------
def bootstrap_ci(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean, *, level: float = 0.95,
                 resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(statistic, low, high): a percentile bootstrap CI of `stat` over the values (seeds)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(x), size=(resamples, len(x)))
    stats = np.sort(np.array([stat(x[d]) for d in draws]))
    alpha = (1.0 - level) / 2.0
    # Order statistics rather than np.quantile's interpolation: an unreached target is +inf.
    lo, hi = stats[int(math.floor(alpha * (resamples - 1)))], stats[int(math.ceil((1.0 - alpha) * (resamples - 1)))]
    return float(stat(x)), float(lo), float(hi)


def first_reach(series: Sequence[float], target: float) -> int | None:
    """The first epoch (1-based count of epochs trained) whose value is <= target, else None."""
    for i, v in enumerate(series):
        if v <= target:
            return i + 1
    return None


def default_targets(results: Sequence[JobResult], margin: float = 0.10) -> dict[tuple[str, int], float]:
    """Per (task, seed): (1 + margin) × the best val loss the constant-lr reference reached on that seed.

    Per seed, because each seed has its own data (linreg's sample, digits' split): a level one
    seed's validation set allows may lie below another's noise floor.
    """
    out = {}
    for r in results:
        if r.method == "constant":
            out[(r.task, r.seed)] = min(r.val_loss) * (1.0 + margin)
    for r in results:  # a study without the reference: the best of any method on that seed
        if (r.task, r.seed) not in out:
            out[(r.task, r.seed)] = min(min(q.val_loss) for q in results if (q.task, q.seed) == (r.task, r.seed)) \
                * (1.0 + margin)
    return out


def _target(targets: Mapping[Any, float], task: str, seed: int) -> float:
    """A task's target given by the user, else the seed's default."""
    return targets[task] if task in targets else targets[(task, seed)]


def load_results(path: str | Path) -> list[JobResult]:
    """The runs of a study.json (to summarise a study again without training)."""
    return [JobResult(**r) for r in json.loads(Path(path).read_text())["runs"]]


def summarize(results: Sequence[JobResult], targets: Mapping[Any, float]) -> list[dict[str, Any]]:
    """One row per (task, method): reach counts, medians/means with bootstrap CIs, lr trajectory, decisions."""
    rows = []
    keys = sorted({(r.task, r.method) for r in results}, key=lambda k: (k[0], list(METHODS).index(k[1])))
    for task, method in keys:
        runs = [r for r in results if r.task == task and r.method == method]
        seed_targets = [_target(targets, task, r.seed) for r in runs]
        reach = [first_reach(r.val_loss, t) for r, t in zip(runs, seed_targets)]
        epochs = [e if e is not None else math.inf for e in reach]
        walls = [r.wall[e - 1] if e is not None else math.inf for r, e in zip(runs, reach)]
        lr = np.array([r.lr for r in runs], dtype=float)
        actions: dict[str, int] = {}
        figures: dict[str, list[float]] = {}
        for r in runs:
            for d in r.decisions:
                actions[d["action"]] = actions.get(d["action"], 0) + 1
                if d["action"] not in ("hold", "stay") and d["value"] is not None and math.isfinite(d["value"]):
                    figures.setdefault(d["figure"], []).append(float(d["value"]))
        rows.append({
            "task": task, "method": method, "seeds": len(runs),
            "target": targets[task] if task in targets else None, "seed_targets": seed_targets,
            "reached": sum(e is not None for e in reach),
            "epochs_to_target": bootstrap_ci(epochs, np.median),
            "seconds_to_target": bootstrap_ci(walls, np.median),
            "final_val_loss": bootstrap_ci([r.val_loss[-1] for r in runs]),
            "best_val_loss": bootstrap_ci([min(r.val_loss) for r in runs]),
            "seconds_total": bootstrap_ci([r.wall[-1] for r in runs]),
            "lr_mean_trajectory": lr.mean(axis=0).tolist(),
            "val_loss_median_trajectory": np.median(np.array([r.val_loss for r in runs]), axis=0).tolist(),
            "actions": actions,
            "figures": {k: [float(np.min(v)), float(np.median(v)), float(np.max(v))] for k, v in figures.items()},
            "probe_evaluations": int(sum(r.probe_evaluations for r in runs)),
        })
    return rows


# ---- the report ----------------------------------------------------------------------------
def _ci(t: tuple[float, float, float], spec: str = ".4g") -> str:
    value, lo, hi = t
    if not math.isfinite(value):
        return "not reached" if value == math.inf else "–"
    hi_s = "∞" if hi == math.inf else format(hi, spec)
    return f"{value:{spec}} [{lo:{spec}}, {hi_s}]"


def markdown_tables(rows: Sequence[dict[str, Any]]) -> str:
    """The study's results as Markdown: one table per task, then the lr trajectories and decisions."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        target = task_rows[0]["target"]
        n_epochs = len(task_rows[0]["lr_mean_trajectory"])
        what = (f"target validation loss {target:.4g}" if target is not None else
                "target: 1.1 × the constant-lr best validation loss of each seed, "
                + ", ".join(f"{t:.4g}" for t in task_rows[0]["seed_targets"]))
        out.append(f"### {task} ({what}; {n_epochs} epochs, {task_rows[0]['seeds']} seeds)\n")
        out.append("| method | reached | epochs to target (median [95% CI]) | seconds to target (median [CI]) "
                   "| final val loss (mean [CI]) | best val loss (mean [CI]) | run seconds (mean) |")
        out.append("| --- | --- | --- | --- | --- | --- | --- |")
        for r in task_rows:
            out.append(f"| {r['method']} | {r['reached']}/{r['seeds']} | {_ci(r['epochs_to_target'], '.0f')} | "
                       f"{_ci(r['seconds_to_target'], '.2f')} | {_ci(r['final_val_loss'])} | "
                       f"{_ci(r['best_val_loss'])} | {r['seconds_total'][0]:.2f} |")
        out.append("")
        marks = sorted({0, n_epochs // 10, n_epochs // 4, n_epochs // 2, (3 * n_epochs) // 4, n_epochs - 1})
        out.append("Mean lr in force at epoch " + ", ".join(str(m) for m in marks) + " (over seeds):\n")
        out.append("| method | " + " | ".join(f"epoch {m}" for m in marks) + " |")
        out.append("| --- |" + " --- |" * len(marks))
        for r in task_rows:
            traj = r["lr_mean_trajectory"]
            out.append(f"| {r['method']} | " + " | ".join(f"{traj[m]:.3g}" for m in marks) + " |")
        out.append("")
        out.append("Decisions (all seeds) and the figures that drove the changes (min / median / max):\n")
        out.append("| method | decisions | driving figure |")
        out.append("| --- | --- | --- |")
        for r in task_rows:
            if not r["actions"]:
                continue
            acts = ", ".join(f"{k} {v}" for k, v in sorted(r["actions"].items()))
            figs = "; ".join(f"{k} {a:.3g} / {b:.3g} / {c:.3g}" for k, (a, b, c) in r["figures"].items()) or "–"
            extra = f" ({r['probe_evaluations']} probe evaluations)" if r["probe_evaluations"] else ""
            out.append(f"| {r['method']} | {acts}{extra} | {figs} |")
        out.append("")
    return "\n".join(out)


def plot_trajectories(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """A PNG with, per task, the mean lr and the median validation loss per epoch of each method."""
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig = Figure(figsize=(11, 3.6 * len(tasks)))
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    for i, task in enumerate(tasks):
        for r in (r for r in rows if r["task"] == task):
            axes[i][0].plot(r["lr_mean_trajectory"], label=r["method"])
            axes[i][1].plot(r["val_loss_median_trajectory"], label=r["method"])
        axes[i][0].set(yscale="log", title=f"{task}: mean lr in force", xlabel="epoch")
        axes[i][1].set(yscale="log", title=f"{task}: median validation loss", xlabel="epoch")
        seed_targets = rows[[r["task"] for r in rows].index(task)]["seed_targets"]
        axes[i][1].axhline(float(np.median(seed_targets)), color="k", lw=0.8, ls=":")
        axes[i][1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def write_study_report(results: Sequence[JobResult], out_dir: str | Path, *, targets: Mapping[str, float] | None = None,
                       header: str = "") -> Path:
    """Writes study.md (tables), study.json (every run's series) and study.png into `out_dir`.

    `targets`: a target validation loss per task; tasks left out get `default_targets` per seed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = {**default_targets(results), **(targets or {})}
    rows = summarize(results, targets)
    shown = {k if isinstance(k, str) else f"{k[0]}/seed{k[1]}": v for k, v in targets.items()}
    (out / "study.json").write_text(json.dumps({"targets": shown, "summary": rows,
                                                "runs": [asdict(r) for r in results]}, default=str))
    plot_trajectories(rows, out / "study.png")
    md = out / "study.md"
    md.write_text((header + "\n\n" if header else "") + markdown_tables(rows) + "\n")
    return md


__all__ = ["METHODS", "StudyJob", "JobResult", "run_job", "local_map", "study_jobs", "run_study", "bootstrap_ci",
           "first_reach", "default_targets", "load_results", "summarize", "markdown_tables", "write_study_report"]
