"""Training health: what went wrong in a run, and where, in plain words.

    from instrumented_adam.analysis import health
    report = health.check_run(store, "baseline")   # works while the run is still training
    print(report.text())                            # one line per finding
    report.healthy                                  # False when any finding is an error

Every check reads the store's frames (`RunData`) only:

- **non-finite** loss, gradients (the kernel's ``nonfinite_grads`` count) and parameters
  (``param_norm``): the first step and epoch, and which layers (from the per-layer rows);
- **divergence**: the loss went non-finite, or ended above where it started; **loss spikes**: an
  epoch whose training loss is more than `HealthThresholds.spike_factor` × the median of the
  epochs before it;
- **plateau** (info: convergence looks the same): the best training loss improved by less than `plateau_tolerance` (relative) over
  the last `plateau_epochs` epochs or more;
- **overfitting**: the validation loss rose more than `overfit_tolerance` (relative) above its
  best while the training loss kept falling; the onset is the first epoch after the best one;
- the **best epoch** (lowest validation loss, else training loss);
- **steps skipped** by a GradScaler (the steps' ``skipped`` column, when the recorder wrote one);
- **layers that stopped moving**: a tensor whose epoch step norm is 0 (or below `frozen_relative`
  × its own largest) for the last `frozen_epochs` epochs;
- the run's status in the store (``diverged``/``failed`` with the store's detail, ``running``).

A finding is an ``error`` (the run is unhealthy: `instrumented-adam check` exits 1), a
``warning`` (worth a look: `check --strict` fails on these too) or ``info``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import pandas as pd

from ..telemetry.store import THETA0_ORIGIN_KEY
from .relations import RunData, load_runs

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[str, ...] = ("error", "warning", "info")


@dataclass(frozen=True)
class HealthThresholds:
    """Tolerances of the checks (defaults suit trainings of tens to thousands of epochs)."""

    spike_factor: float = 2.0      # loss > factor × median of the previous `spike_window` epochs
    spike_window: int = 5
    plateau_tolerance: float = 1e-3  # relative improvement of the best training loss
    plateau_epochs: int = 10        # at least this many epochs (or 20% of the run, if more)
    overfit_tolerance: float = 0.05  # validation above (1 + tol) × its best
    overfit_train_drop: float = 0.0  # training loss must have fallen by more than this (relative)
    frozen_relative: float = 1e-9   # step norm ≤ this × the tensor's largest is "not moving"
    frozen_epochs: int = 3


@dataclass(frozen=True)
class Finding:
    """One diagnosis: its kind (a stable key for scripts), severity, where, and a sentence."""

    kind: str
    severity: Severity
    message: str
    epoch: int | None = None
    step: int | None = None
    layers: tuple[str, ...] = ()


@dataclass
class RunHealth:
    """The findings of one run."""

    run_id: int
    name: str
    status: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.run_id}:{self.name}"

    @property
    def healthy(self) -> bool:
        """No error-level finding."""
        return not any(f.severity == "error" for f in self.findings)

    def worst(self) -> str:
        """'error', 'warning', 'info' or 'ok'."""
        for severity in SEVERITIES:
            if any(f.severity == severity for f in self.findings):
                return severity
        return "ok"

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def text(self) -> str:
        """The findings, one line each, errors first."""
        head = f"run {self.label} ({self.status}): " + ("healthy" if self.healthy else "UNHEALTHY")
        order = sorted(self.findings, key=lambda f: SEVERITIES.index(f.severity))
        return "\n".join([head] + [f"  {f.severity:7s} {f.message}" for f in order])


def _int(value: Any) -> int | None:
    try:
        return None if value is None or pd.isna(value) else int(value)
    except (TypeError, ValueError):
        return None


def _loss_columns(epochs: pd.DataFrame) -> list[str]:
    return [c for c in ("train_loss", "val_loss") if c in epochs]


def _check_nonfinite(run: RunData, out: list[Finding]) -> None:
    e, s, layers = run.epochs, run.steps, run.layers
    for col in _loss_columns(e):
        values = e[col].to_numpy(float)
        logged = np.isfinite(values)
        # SQLite keeps NaN as NULL: a loss missing after it was logged is the NaN it was.
        bad = ~logged & (np.cumsum(logged) > 0) | np.isinf(values)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            out.append(Finding("nonfinite_loss", "error", f"{col} is not finite from epoch {int(e['epoch'].iloc[k])} "
                               f"(last finite value {values[logged][-1] if logged[:k].any() else float('nan'):.4g})",
                               epoch=int(e["epoch"].iloc[k])))
    if len(s) and "nonfinite_grads" in s:
        counts = s["nonfinite_grads"].to_numpy(float)
        hit = np.flatnonzero(counts > 0)
        if hit.size:
            first = s.iloc[int(hit[0])]
            bad_layers: tuple[str, ...] = ()
            where = ""
            if len(layers) and "nonfinite_grads" in layers:
                # Layer rows hold each epoch's last step: name the layers of the first epoch that has any
                # (once parameters are NaN every later gradient is, so later epochs say nothing).
                rows = layers[layers["nonfinite_grads"].to_numpy(float) > 0]
                if len(rows):
                    first_epoch = int(rows["epoch"].min())
                    bad_layers = tuple(dict.fromkeys(rows[rows["epoch"] == first_epoch]["layer"]))
                    where = f"; layers at the end of epoch {first_epoch}: {', '.join(bad_layers)}"
            out.append(Finding(
                "nonfinite_grads", "error",
                f"non-finite gradient elements from step {int(first['step'])} (epoch {int(first['epoch'])}): "
                f"{int(counts[hit[0]])} at that step, {hit.size} step(s) affected{where}",
                epoch=int(first["epoch"]), step=int(first["step"]), layers=bad_layers,
            ))
    param = None
    if len(s) and "param_norm" in s:
        values = s["param_norm"].to_numpy(float)
        present = ~np.isnan(values) | (np.cumsum(np.isfinite(values)) > 0)
        bad = np.flatnonzero(present & ~np.isfinite(values))
        if bad.size:
            param = (int(s["epoch"].iloc[bad[0]]), int(s["step"].iloc[bad[0]]))
    if param is not None:
        bad_layers = ()
        where = ""
        if len(layers) and "param_norm" in layers:
            rows = layers[~np.isfinite(layers["param_norm"].to_numpy(float))]
            if len(rows):
                first_epoch = int(rows["epoch"].min())
                bad_layers = tuple(dict.fromkeys(rows[rows["epoch"] == first_epoch]["layer"]))
                where = f"; layers at the end of epoch {first_epoch}: {', '.join(bad_layers)}"
        out.append(Finding("nonfinite_params", "error", f"parameters are not finite from step {param[1]} (epoch {param[0]}){where}",
                           epoch=param[0], step=param[1], layers=bad_layers))


def _check_loss_shape(run: RunData, th: HealthThresholds, out: list[Finding]) -> None:
    e = run.epochs
    if "train_loss" not in e:
        return
    epochs = e["epoch"].to_numpy(int)
    train = e["train_loss"].to_numpy(float)
    finite = np.isfinite(train)
    if finite.sum() >= 2:
        first, last = train[finite][0], train[finite][-1]
        if not finite[-1] and finite.any() or last > first:
            k = int(epochs[finite][np.argmin(train[finite])])
            what = "went non-finite" if not finite[-1] else f"ended above its start ({last:.4g} > {first:.4g})"
            out.append(Finding("divergence", "error", f"training diverged: the training loss {what}; lowest at epoch {k}",
                               epoch=k))
    for i in range(th.spike_window, len(train)):
        before = train[i - th.spike_window:i]
        before = before[np.isfinite(before)]
        if before.size and np.isfinite(train[i]) and train[i] > th.spike_factor * np.median(before) and np.median(before) > 0:
            out.append(Finding("loss_spike", "warning", f"loss spike at epoch {int(epochs[i])}: training loss {train[i]:.4g}, "
                               f"{train[i] / np.median(before):.1f}× the median of the {th.spike_window} epochs before",
                               epoch=int(epochs[i])))
    # Plateau: the best loss so far stopped improving for long enough at the end of the run.
    if finite.sum() >= th.plateau_epochs + 1:
        best = np.fmin.accumulate(np.where(finite, train, np.inf))
        need = max(th.plateau_epochs, int(0.2 * len(train)))
        final = best[-1]
        # first epoch from which the best improved by less than the tolerance up to the end
        within = best <= final * (1 + th.plateau_tolerance) + 1e-300
        start = int(np.argmax(within))
        if len(train) - start >= need and final > 0:
            # Info, not a warning: converging to the minimum looks the same from the loss alone.
            out.append(Finding("plateau", "info", f"plateau (or convergence) from epoch {int(epochs[start])}: the best training loss improved "
                               f"by less than {th.plateau_tolerance:.0e} (relative) over the last {len(train) - start} epochs",
                               epoch=int(epochs[start])))


def _check_overfitting(run: RunData, th: HealthThresholds, out: list[Finding]) -> None:
    e = run.epochs
    if "val_loss" in e and e["val_loss"].notna().any():
        val = e["val_loss"].to_numpy(float)
        k = int(np.nanargmin(val))
        best_epoch = int(e["epoch"].iloc[k])
        out.append(Finding("best_epoch", "info", f"best epoch {best_epoch}: lowest validation loss {val[k]:.4g}", epoch=best_epoch))
        if "train_loss" in e and k + 1 < len(val):
            train = e["train_loss"].to_numpy(float)
            later = val[k + 1:]
            above = np.flatnonzero(later > val[k] * (1 + th.overfit_tolerance))
            train_fell = np.isfinite(train[-1]) and train[-1] < train[k] * (1 - th.overfit_train_drop)
            # Rising while training falls, and still above at the end (not one noisy epoch).
            if above.size and later[-1] > val[k] * (1 + th.overfit_tolerance) and train_fell:
                onset = int(e["epoch"].iloc[k + 1])
                out.append(Finding(
                    "overfitting", "warning",
                    f"overfitting from epoch {onset}: validation loss rose from {val[k]:.4g} (epoch {best_epoch}) to "
                    f"{later[-1]:.4g} while the training loss fell from {train[k]:.4g} to {train[-1]:.4g}",
                    epoch=onset,
                ))
    elif "train_loss" in e and e["train_loss"].notna().any():
        k = int(np.nanargmin(e["train_loss"].to_numpy(float)))
        out.append(Finding("best_epoch", "info", f"best epoch {int(e['epoch'].iloc[k])} by training loss (no validation loss logged)",
                           epoch=int(e["epoch"].iloc[k])))


def _check_skipped(run: RunData, out: list[Finding]) -> None:
    s, e = run.steps, run.epochs
    if (not len(s) or "skipped" not in s) and "skipped_steps" in e:
        # Step rows thinned (step_every > 1) or absent: the epoch rows still count the skips.
        counts = e["skipped_steps"].fillna(0).to_numpy(float)
        if (counts > 0).any():
            k = int(np.flatnonzero(counts > 0)[0])
            out.append(Finding("skipped_steps", "warning",
                               f"{int(counts.sum())} step(s) skipped by the GradScaler (inf/NaN gradients), first in "
                               f"epoch {int(e['epoch'].iloc[k])}", epoch=int(e["epoch"].iloc[k])))
        return
    if not len(s) or "skipped" not in s:
        return
    skipped = s["skipped"].fillna(0).to_numpy(float) > 0
    if skipped.any():
        first = s.iloc[int(np.flatnonzero(skipped)[0])]
        out.append(Finding("skipped_steps", "warning",
                           f"{int(skipped.sum())} recorded step(s) skipped by the GradScaler (inf/NaN gradients), "
                           f"first at step {int(first['step'])} (epoch {int(first['epoch'])})",
                           epoch=int(first["epoch"]), step=int(first["step"])))


def _check_frozen(run: RunData, th: HealthThresholds, out: list[Finding]) -> None:
    layers = run.layers
    if not len(layers) or "step_norm" not in layers:
        return
    frozen = []
    since = []
    for name, rows in layers.sort_values("epoch").groupby("layer", sort=False):
        norms = rows["step_norm"].to_numpy(float)
        epochs = rows["epoch"].to_numpy(int)
        if len(norms) < th.frozen_epochs:
            continue
        largest = np.nanmax(norms) if np.isfinite(norms).any() else 0.0
        still = np.isfinite(norms) & (norms <= th.frozen_relative * largest)
        if still[-th.frozen_epochs:].all():
            moving = np.flatnonzero(~still)
            start = int(epochs[moving[-1] + 1]) if moving.size else int(epochs[0])
            frozen.append(str(name))
            since.append(start)
    if frozen:
        parts = ", ".join(f"{n} (from epoch {e})" for n, e in zip(frozen, since))
        out.append(Finding("frozen_layers", "warning", f"{len(frozen)} layer(s) stopped moving: {parts}", epoch=min(since),
                           layers=tuple(frozen)))


def _check_status(run: RunData, out: list[Finding]) -> None:
    status = str(run.info.get("status") or "")
    detail = run.info.get("status_detail") or run.info.get("detail")
    detail = f" ({detail})" if isinstance(detail, str) and detail else ""
    if status in ("diverged", "failed"):
        out.append(Finding("status", "error", f"the store marks the run {status}{detail}"))
    elif status == "running":
        out.append(Finding("status", "info", f"still running (or stopped without closing its recorder){detail}"))


def _check_theta0(run: RunData, out: list[Finding]) -> None:
    origin = run.hyperparameters.get(THETA0_ORIGIN_KEY)
    if origin:
        out.append(Finding("theta0_origin", "info", f"distance from init is measured from {origin}"))


def diagnose(run: RunData, thresholds: HealthThresholds | None = None) -> RunHealth:
    """The health findings of one loaded run (see the module docstring for the checks)."""
    th = thresholds or HealthThresholds()
    findings: list[Finding] = []
    _check_status(run, findings)
    _check_nonfinite(run, findings)
    _check_loss_shape(run, th, findings)
    _check_overfitting(run, th, findings)
    _check_skipped(run, findings)
    _check_frozen(run, th, findings)
    _check_theta0(run, findings)
    return RunHealth(run.run_id, run.name, str(run.info.get("status") or ""), findings)


def check_runs(store: Any, runs: Iterable[int | str] | None = None, thresholds: HealthThresholds | None = None) -> list[RunHealth]:
    """`diagnose` for runs of a `RunStore` (all when None or empty)."""
    return [diagnose(r, thresholds) for r in load_runs(store, runs)]


def check_run(store: Any, run: int | str, thresholds: HealthThresholds | None = None) -> RunHealth:
    """`diagnose` for one stored run."""
    return check_runs(store, [run], thresholds)[0]


def summary_sentences(health: RunHealth, limit: int = 6) -> Sequence[str]:
    """The findings for the report's opening, errors and warnings first, at most `limit`."""
    order = sorted(health.findings, key=lambda f: SEVERITIES.index(f.severity))
    return [f.message for f in order[:limit]]


__all__ = ["HealthThresholds", "Finding", "RunHealth", "diagnose", "check_runs", "check_run", "summary_sentences", "SEVERITIES"]
