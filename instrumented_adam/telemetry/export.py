"""Exports of a run store: TensorBoard event files, CSV and Parquet.

TensorBoard tags follow what users already see from PyTorch Lightning and their own loggers
(x axis: the optimizer step, for every tag; epoch rows at the epoch's last step):

    lr-<Optimizer>[/pg<i>]              learning rate (Lightning's LearningRateMonitor names;
    lr-<Optimizer>[/pg<i>]-momentum       /pg<i> only with several param groups, 1-based)
    lr-<Optimizer>[/pg<i>]-weight_decay   beta1 (or SGD's momentum) as "momentum", as Lightning logs it
    optimizer/<figure>                  overall step figures (update_norm, grad_norm, ...)
    optimizer/<hyperparameter>          the run's other hyperparameters in force (beta2, eps, ...)
    optimizer/pg<i>/<figure>            per-group step figures (several groups only)
    epoch                               the epoch index (as Lightning logs it)
    epoch/<figure>                      epoch geometry (step_norm, cos_prev, distance_from_init, ...)
                                        and epoch aggregates (update_norm_mean, ..._min, ..._max)
    <metric>                            user metrics under their own names (train_loss, val_loss)
    layers/<parameter name>/<figure>    per-tensor epoch figures
    histograms/<kind>_log2              the kernel's step histograms (histogram_every) of log2 |x| over
    histograms/<layer>/<kind>_log2        all tensors and per tensor, unit-wide buckets [e, e+1) (the
                                          bins of core/histogram.py); exact zeros and NaN/inf are left
                                          out of the histogram and logged as histograms/<kind>_zeros
                                          and histograms/<kind>_nonfinite counts

CSV and Parquet: one file per table (runs, steps, step_groups, epochs, layers, metrics, and
histograms when the exported runs have any), the frames of `RunStore`'s loaders; in histograms the
counts are one column per bin (`bin_<b>`, core/histogram.py numbers them).

Nothing is written outside the output directory: a run's directory name is made from its id and
its name with every character other than letters, digits, '.', '_' and '-' replaced (a run named
``a/../../x`` exports to ``<logdir>/3-a_.._.._x``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..core.histogram import HISTOGRAM_BINS, HISTOGRAM_NAMES
from .store import KNOWN_HYPERPARAMETERS, RunStore

_TABLES = ("runs", "steps", "step_groups", "epochs", "layers", "metrics", "histograms")
_STEP_KEYS = frozenset({"run_id", "step", "epoch", "grp"})
_EPOCH_KEYS = frozenset({"run_id", "epoch", "step", "num_steps", "recorded_steps", "wall_time"})
_LAYER_KEYS = frozenset({"run_id", "epoch", "layer_index", "layer", "grp", "numel"})
# Hyperparameters shown under Lightning's lr-<Optimizer> tags rather than optimizer/<name>.
_LR_TAGGED = frozenset({"lr", "weight_decay", "beta1", "momentum"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_file_name(name: str, max_length: int = 100) -> str:
    """`name` as one file name component: characters other than letters, digits, '.', '_' and
    '-' become '_' (so no separator, no drive, no '..' component), never empty or hidden."""
    cleaned = _UNSAFE.sub("_", str(name))[:max_length]
    if cleaned.strip(".") == "" or cleaned.startswith("."):
        cleaned = "_" + cleaned
    return cleaned


def _inside(directory: Path, child: Path) -> Path:
    """`child`, after checking that it resolves inside `directory` (no write ever escapes it)."""
    root, target = directory.resolve(), child.resolve()
    if target != root and root not in target.parents:
        raise ValueError(f"refusing to write {child}: it is outside the output directory {directory}")
    return child


def _finite(value: Any) -> bool:
    try:
        return value is not None and not math.isnan(float(value))
    except (TypeError, ValueError):
        return False


class TensorBoardLogger:
    """Writes recorder rows as TensorBoard scalars (see the module docstring for the tags).

    Used by `Recorder(tensorboard=logdir)` while training and by `to_tensorboard` after it.
    """

    def __init__(self, logdir: str | Path, optimizer_name: str = "Adam", num_groups: int | None = None,
                 hyperparameters: Iterable[str] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: slow, and optional

        self.logdir = Path(logdir)
        self.writer = SummaryWriter(log_dir=str(self.logdir))
        self.optimizer_name = optimizer_name
        self.num_groups = num_groups
        # The run's hyperparameter columns (RunStore.hyperparameter_columns); by name otherwise.
        self.hyperparameters = frozenset(hyperparameters if hyperparameters is not None else KNOWN_HYPERPARAMETERS)

    def _scalar(self, tag: str, value: Any, step: int, walltime: float | None = None) -> None:
        if _finite(value):  # NaN (undefined cosine) is left out rather than drawn as a gap marker
            self.writer.add_scalar(tag, float(value), int(step), walltime=walltime)

    def _lr_tags(self, row: Mapping[str, Any], step: int, group: int | None) -> None:
        name = f"lr-{self.optimizer_name}" + (f"/pg{group + 1}" if group is not None else "")
        self._scalar(name, row.get("lr"), step)
        self._scalar(f"{name}-momentum", row.get("beta1", row.get("momentum")), step)
        self._scalar(f"{name}-weight_decay", row.get("weight_decay"), step)

    def log_steps(self, rows: Iterable[Mapping[str, Any]], group_rows: Iterable[Mapping[str, Any]] = ()) -> None:
        """Step rows (overall figures, hyperparameters of group 0) and per-group rows."""
        group_rows = list(group_rows)
        several = len({r["grp"] for r in group_rows}) > 1 or (self.num_groups or 1) > 1
        for row in rows:
            step = row["step"]
            if not several:
                self._lr_tags(row, step, None)
            for key, value in row.items():
                if key not in _STEP_KEYS and key not in _LR_TAGGED:
                    self._scalar(f"optimizer/{key}", value, step)
        if several:
            for row in group_rows:
                g, step = int(row["grp"]), row["step"]
                self._lr_tags(row, step, g)
                for key, value in row.items():
                    if key not in _STEP_KEYS and key not in self.hyperparameters:
                        self._scalar(f"optimizer/pg{g + 1}/{key}", value, step)

    def log_epoch(self, row: Mapping[str, Any], metrics: Mapping[str, float], layers: Sequence[Mapping[str, Any]] = ()) -> None:
        """An epoch row with its metrics and per-layer rows, at the epoch's last step."""
        step = int(row["step"])
        walltime = row.get("wall_time") if _finite(row.get("wall_time")) else None
        self._scalar("epoch", row["epoch"], step, walltime)
        for key, value in row.items():
            if key not in _EPOCH_KEYS and key not in self.hyperparameters and key not in metrics:
                self._scalar(f"epoch/{key}", value, step, walltime)
        self.log_metrics(row["epoch"], step, metrics, walltime)
        for layer in layers:
            name = str(layer["layer"])
            for key, value in layer.items():
                if key not in _LAYER_KEYS:
                    self._scalar(f"layers/{name}/{key}", value, step, walltime)

    def log_metrics(self, epoch: int, step: int | None, metrics: Mapping[str, float], walltime: float | None = None) -> None:
        """User metrics under their own names (at `step`, or at `epoch` when the step is unknown)."""
        for name, value in metrics.items():
            self._scalar(name, value, step if step is not None else epoch, walltime)

    def _histogram(self, tag: str, counts: Any, step: int) -> None:
        """One log2 histogram as TensorBoard's raw histogram (see the module docstring)."""
        from ..core.histogram import FIRST_EXPONENT_BIN, MIN_EXPONENT, NONFINITE_BIN, OVERFLOW_BIN, UNDERFLOW_BIN, ZERO_BIN

        c = [int(x) for x in counts]
        self._scalar(f"{tag}_zeros", c[ZERO_BIN], step)
        self._scalar(f"{tag}_nonfinite", c[NONFINITE_BIN], step)
        used = [b for b in range(UNDERFLOW_BIN, OVERFLOW_BIN + 1) if c[b]]
        if not used:
            return
        lo, hi = used[0], used[-1]
        # log2 |x| of bin b lies in [e, e+1) with e = b - FIRST_EXPONENT_BIN + MIN_EXPONENT (the
        # underflow and overflow bins are drawn as the buckets next to the exponent range).
        left = [b - FIRST_EXPONENT_BIN + MIN_EXPONENT for b in range(lo, hi + 1)]
        num = sum(c[lo : hi + 1])
        centres = [e + 0.5 for e in left]
        total = sum(n * x for n, x in zip(c[lo : hi + 1], centres))
        squares = sum(n * x * x for n, x in zip(c[lo : hi + 1], centres))
        self.writer.add_histogram_raw(tag + "_log2", min=float(left[0]), max=float(left[-1] + 1), num=num, sum=total,
                                      sum_squares=squares, bucket_limits=[float(e + 1) for e in left],
                                      bucket_counts=c[lo : hi + 1], global_step=int(step))

    def log_histograms(self, step: int, layers: Sequence[str], counts: Any) -> None:
        """One step's histograms: counts [tensors, kinds, bins] (numpy), overall and per tensor."""
        from ..core.histogram import HISTOGRAM_NAMES

        for k, kind in enumerate(HISTOGRAM_NAMES):
            self._histogram(f"histograms/{kind}", counts[:, k].sum(axis=0), step)
            for i, layer in enumerate(layers[: counts.shape[0]]):
                self._histogram(f"histograms/{layer}/{kind}", counts[i, k], step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _open(store: RunStore | str | Path) -> tuple[RunStore, bool]:
    return (store, False) if isinstance(store, RunStore) else (RunStore(store), True)


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return df.to_dict("records")


def to_tensorboard(store: RunStore | str | Path, logdir: str | Path, run: int | str | None = None, *, layers: bool = True) -> list[Path]:
    """Writes TensorBoard event files of one run (or all runs, one subdirectory each).

    A run goes to ``<logdir>/<run_id>-<name>`` so that TensorBoard shows runs side by side.
    Returns the run directories written.
    """
    store, owned = _open(store)
    try:
        runs = store.runs()
        if run is not None:
            runs = runs[runs["run_id"] == store.run_id(run)]
        written = []
        for info in _records(runs):
            run_id = int(info["run_id"])
            directory = _inside(Path(logdir), Path(logdir) / safe_file_name(f"{run_id}-{info['name']}"))
            logger = TensorBoardLogger(directory, optimizer_name=safe_file_name(info.get("optimizer") or "Adam"),
                                       num_groups=None if pd.isna(info.get("num_groups")) else int(info["num_groups"]),
                                       hyperparameters=store.hyperparameter_columns(run_id))
            try:
                steps = store.steps(run_id).drop(columns=["run_id"])
                group_rows = _records(store.step_groups(run_id).drop(columns=["run_id"])) if logger.num_groups and logger.num_groups > 1 else []
                logger.log_steps(_records(steps), group_rows)
                epochs = store.epochs(run_id, with_metrics=False)
                metrics = store.metrics(run_id)
                layer_frame = store.layers(run_id) if layers else None
                for row in _records(epochs):
                    epoch = row["epoch"]
                    m = metrics[metrics["epoch"] == epoch]
                    layer_rows = _records(layer_frame[layer_frame["epoch"] == epoch]) if layer_frame is not None else []
                    logger.log_epoch(row, dict(zip(m["name"], m["value"])), layer_rows)
                recorded = set(epochs["epoch"])
                late = metrics[~metrics["epoch"].isin(recorded)]
                for epoch, m in late.groupby("epoch"):
                    logger.log_metrics(int(epoch), None, dict(zip(m["name"], m["value"])))
                hist = store.histograms(run_id)
                for step, frame in hist.groupby("step"):
                    layers = frame.drop_duplicates("layer_index").sort_values("layer_index")
                    counts = np.zeros((int(layers["layer_index"].max()) + 1, len(HISTOGRAM_NAMES), HISTOGRAM_BINS),
                                      dtype=np.int64)
                    for row in frame.itertuples():
                        counts[int(row.layer_index), HISTOGRAM_NAMES.index(row.kind)] = row.counts
                    names = [f"param.{i}" for i in range(counts.shape[0])]
                    for row in layers.itertuples():
                        names[int(row.layer_index)] = str(row.layer)
                    logger.log_histograms(int(step), names, counts)
            finally:
                logger.close()
            written.append(directory)
        return written
    finally:
        if owned:
            store.close()


def _frames(store: RunStore, run: int | str | None) -> dict[str, pd.DataFrame]:
    runs = store.runs()
    if run is not None:
        runs = runs[runs["run_id"] == store.run_id(run)]
    runs = runs.copy()
    for col in ("hyperparameters", "optimizer_config", "hyperparameter_columns"):  # nested values: JSON text in flat files
        runs[col] = runs[col].map(lambda v: json.dumps(v, sort_keys=True) if not isinstance(v, str) else v)
    frames = {
        "runs": runs,
        "steps": store.steps(run),
        "step_groups": store.step_groups(run),
        "epochs": store.epochs(run),
        "layers": store.layers(run),
        "metrics": store.metrics(run),
    }
    histograms = store.histograms(run)
    if len(histograms):  # only runs recorded with histogram_every have them
        frames["histograms"] = _wide_histograms(histograms)
    return frames


def _wide_histograms(df: pd.DataFrame) -> pd.DataFrame:
    """The histograms frame with its counts as one integer column per bin (flat files hold no arrays)."""
    keys = df.drop(columns=["counts"])
    if df.empty:
        return keys.assign(**{f"bin_{b}": pd.Series(dtype="int64") for b in range(HISTOGRAM_BINS)})
    bins = pd.DataFrame(np.stack(list(df["counts"])), columns=[f"bin_{b}" for b in range(HISTOGRAM_BINS)],
                        index=df.index)
    return pd.concat([keys, bins], axis=1)


def _write_tables(store: RunStore | str | Path, directory: str | Path, run: int | str | None, suffix: str,
                  write: Callable[[pd.DataFrame, Path], None]) -> dict[str, Path]:
    """Writes each table of one run (or all) to `directory`/<table><suffix> with `write`."""
    store, owned = _open(store)
    try:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, df in _frames(store, run).items():
            paths[name] = _inside(out, out / f"{name}{suffix}")
            write(df, paths[name])
        return paths
    finally:
        if owned:
            store.close()


def to_csv(store: RunStore | str | Path, directory: str | Path, run: int | str | None = None) -> dict[str, Path]:
    """Writes runs/steps/step_groups/epochs/layers/metrics/histograms.csv of one run (or all) to `directory`."""
    return _write_tables(store, directory, run, ".csv", lambda df, path: df.to_csv(path, index=False))


def to_parquet(store: RunStore | str | Path, directory: str | Path, run: int | str | None = None) -> dict[str, Path]:
    """Writes runs/steps/step_groups/epochs/layers/metrics/histograms.parquet of one run (or all) (needs pyarrow)."""
    return _write_tables(store, directory, run, ".parquet", lambda df, path: df.to_parquet(path, index=False))


__all__ = ["TensorBoardLogger", "to_tensorboard", "to_csv", "to_parquet", "safe_file_name"]
