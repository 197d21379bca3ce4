"""The demo's built-in tasks and the training loop that records them.

Two tasks, both on data that ships with the package's dependencies (nothing is downloaded):

``linreg``
    y = m·x + b fitted by mean squared error on generated data. The model has exactly two
    parameters (``slope`` and ``intercept``), so the optimizer's whole path can be drawn on the
    loss surface. That surface is a quadratic whose coefficients are moments of the training
    data; they are stored with the run (``hyperparameters["loss_surface"]``) so that a report
    drawn later from the store alone can contour it. The slope and intercept are logged as
    epoch metrics.
``digits``
    The classic teaching MLP (pixels → 75 → 50 → 25 → 10, tanh by default, or ReLU) on
    scikit-learn's bundled 8×8 digits (``load_digits``), 80/20 stratified train/validation split.
``pvfinder``, ``pvfinder-unet``
    Primary-vertex finding on generated LHCb-like events (`instrumented_adam.demo.pvfinder`): a
    1D convolutional network (AllCNN-style stack, or a 1D U-Net) maps the tracks' kernel density
    along the beam axis to a histogram peaked at the vertices, trained with PV-finder's
    asymmetric cost; the vertex-finding efficiency and false positives per event are epoch
    metrics. Not part of ``demo --task all`` (minutes rather than seconds): ask for it by name.

`train_task` trains one task with one instrumented optimizer and records it with a
`instrumented_adam.recorder.Recorder`; the CLI's ``demo`` command is a loop over it.

Training and validation losses are evaluated on the full sets at each epoch end (in eval
mode) rather than averaged over the epoch's minibatches: the report compares the change of
the training loss with the first-order prediction Σ⟨Δθ, g⟩ of the epoch's steps, and that
comparison needs the loss at the parameters where the epoch ends.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..analysis.interactive import EPOCH_METRIC_PANELS_KEY
from ..analysis.surfaces import LOSS_SURFACE_KEY, quadratic_mse
from ..core import classic as _classic
from ..core import optimizer as _optim
from ..telemetry.recorder import Recorder
from ..telemetry.store import RunStore

#: Optimizer names accepted by the demo, mapped to their classes.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": _optim.Adam,
    "adamw": _optim.AdamW,
    "adamax": _optim.Adamax,
    "sgd": _classic.SGD,
    "rmsprop": _classic.RMSprop,
    "adagrad": _classic.Adagrad,
}

#: Momentum when the command line does not say (SGD without momentum is rarely what one compares
#: with Adam; torch's RMSprop default is none).
DEFAULT_MOMENTUM: dict[str, float] = {"sgd": 0.9, "rmsprop": 0.0}

#: Learning-rate schedules of the demo (stepped once per epoch).
SCHEDULES: tuple[str, ...] = ("cosine", "constant")

#: Key of the run hyperparameters under which a 2-parameter task describes its loss surface.


@dataclass(frozen=True)
class Data:
    """Training and validation tensors of a task."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer and loop settings of one demo run. ``None`` means the task's default."""

    optimizer: str = "adam"
    lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    epochs: int | None = None
    batch_size: int | None = None
    schedule: str = "cosine"
    seed: int = 0
    activation: str = "tanh"  # digits only (tanh: no dead units, see DigitsTask)
    histogram_every: int = 0  # the optimizer's kernel histograms every N steps (0: none)
    momentum: float | None = None  # SGD and RMSprop only (None: DEFAULT_MOMENTUM)
    nesterov: bool = False  # SGD only

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"the learning rate must be a positive number, got {self.lr}")
        if self.weight_decay is not None and not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"the weight decay must be >= 0, got {self.weight_decay}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"the batch size must be >= 1, got {self.batch_size}")
        if self.momentum is not None and not (0.0 <= self.momentum < 1.0):
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose from {', '.join(ACTIVATIONS)}")


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}



class Task:
    """A demo task: data, model, loss and evaluation, with defaults per optimizer."""

    name: str = ""
    description: str = ""
    default_epochs: int = 10
    default_batch_size: int = 32
    #: Default learning rate per optimizer (Adamax's default in torch is higher: 2e-3).
    default_lr: Mapping[str, float] = {}
    #: Default weight decay per optimizer (AdamW's torch default, 1e-2; none for the others).
    default_weight_decay: Mapping[str, float] = {"adam": 0.0, "adamw": 1e-2, "adamax": 0.0, "sgd": 0.0,
                                                 "rmsprop": 0.0, "adagrad": 0.0}

    #: Number of training examples (known without loading the data: for progress bars).
    train_size: int = 0

    def data(self, seed: int) -> Data:
        raise NotImplementedError

    def model(self, config: TrainConfig, data: Data) -> nn.Module:
        """A freshly initialised model (torch's RNG seeded by the caller)."""
        raise NotImplementedError

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Data) -> dict[str, float]:
        """Full-set metrics at the current parameters: train_loss, val_loss (+ accuracies)."""
        model.eval()
        out = {
            "train_loss": float(self.loss(model(data.x_train), data.y_train)),
            "val_loss": float(self.loss(model(data.x_val), data.y_val)),
        }
        model.train()
        return out

    def run_hyperparameters(self, data: Data, model: nn.Module) -> dict[str, Any]:
        """Task facts stored with the run (e.g. what the report needs to draw a loss surface)."""
        return {}

    def epoch_metrics(self, model: nn.Module) -> dict[str, float]:
        """Extra per-epoch metrics (e.g. the two parameters of the linear model)."""
        return {}

    def resolve(self, config: TrainConfig) -> TrainConfig:
        """The config with every ``None`` replaced by this task's default."""
        return replace(
            config,
            lr=config.lr if config.lr is not None else self.default_lr[config.optimizer],
            weight_decay=config.weight_decay if config.weight_decay is not None else self.default_weight_decay[config.optimizer],
            epochs=config.epochs if config.epochs is not None else self.default_epochs,
            batch_size=config.batch_size if config.batch_size is not None else self.default_batch_size,
            momentum=config.momentum if config.momentum is not None else DEFAULT_MOMENTUM.get(config.optimizer),
        )


class LinearModel(nn.Module):
    """ŷ = slope·x + intercept, two scalar parameters (their names are the layer names)."""

    def __init__(self, slope: float, intercept: float) -> None:
        super().__init__()
        self.slope = nn.Parameter(torch.tensor(float(slope)))
        self.intercept = nn.Parameter(torch.tensor(float(intercept)))

    def forward(self, x: Tensor) -> Tensor:
        return self.slope * x + self.intercept


class LinearRegressionTask(Task):
    """y = 2x − 1 + N(0, 0.5²), x ~ U(−1, 3): 192 training and 64 validation points.

    The start (slope −1, intercept 2) is fixed and far from the solution, so the path across
    the loss surface is long enough to see. x is not centred, which tilts the loss surface's
    ellipses: Adam's per-coordinate step sizes then visibly depart from the gradient direction.
    """

    name = "linreg"
    description = "2-parameter linear regression y = m·x + b (MSE)"
    default_epochs = 100
    default_batch_size = 32
    default_lr = {"adam": 0.1, "adamw": 0.1, "adamax": 0.1, "sgd": 0.02, "rmsprop": 0.05, "adagrad": 0.5}
    true_slope, true_intercept, noise = 2.0, -1.0, 0.5
    start = (-1.0, 2.0)
    n_train, n_val = 192, 64
    train_size = n_train

    def data(self, seed: int) -> Data:
        rng = np.random.default_rng(seed)
        n = self.n_train + self.n_val
        x = rng.uniform(-1.0, 3.0, n)
        y = self.true_slope * x + self.true_intercept + rng.normal(0.0, self.noise, n)

        def t(a: np.ndarray) -> Tensor:
            return torch.tensor(a, dtype=torch.float32)

        return Data(t(x[: self.n_train]), t(y[: self.n_train]), t(x[self.n_train :]), t(y[self.n_train :]))

    def model(self, config: TrainConfig, data: Data) -> nn.Module:
        return LinearModel(*self.start)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return torch.mean((output - target) ** 2)

    def run_hyperparameters(self, data: Data, model: nn.Module) -> dict[str, Any]:
        x, y = data.x_train.double().numpy(), data.y_train.double().numpy()
        optimum = least_squares(x, y)
        return {
            LOSS_SURFACE_KEY: {
                # MSE(m, b) = m²·xx + 2mb·x + b² − 2m·xy − 2b·y + yy, the means over the training set.
                "kind": "quadratic_mse",
                "params": ["slope", "intercept"],
                "moments": {
                    "xx": float(np.mean(x * x)),
                    "x": float(np.mean(x)),
                    "xy": float(np.mean(x * y)),
                    "y": float(np.mean(y)),
                    "yy": float(np.mean(y * y)),
                },
                "start": [model.slope.item(), model.intercept.item()],
                "optimum": [float(optimum[0]), float(optimum[1])],
            }
        }

    def epoch_metrics(self, model: nn.Module) -> dict[str, float]:
        return {"slope": model.slope.item(), "intercept": model.intercept.item()}


def least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(slope, intercept) minimising the MSE of y ≈ slope·x + intercept (numpy.linalg.lstsq)."""
    design = np.stack([x, np.ones_like(x)], axis=1)
    return np.linalg.lstsq(design, y, rcond=None)[0]


class DigitsTask(Task):
    """The 75-50-25 MLP on scikit-learn's 8×8 digits (1797 images, bundled with scikit-learn).

    Inputs are the 64 pixels minus those constant over the training split (3 or 4 border pixels,
    always 0), standardised with the training split's mean and standard deviation. Dropping the
    constant pixels matters for the statistics, not the accuracy: their weights never receive a
    gradient, so their second moment stays 0 and their effective step size lr/ε (10⁵ at the
    defaults) would dominate the mean effective learning rate. For the same reason the default
    activation is tanh: a ReLU unit that dies leaves its weights with v = 0 as well.
    """

    name = "digits"
    description = "MLP 75-50-25 on scikit-learn's 8×8 digits (cross-entropy)"
    default_epochs = 30
    default_batch_size = 32
    default_lr = {"adam": 1e-3, "adamw": 1e-3, "adamax": 2e-3, "sgd": 1e-2, "rmsprop": 1e-3, "adagrad": 1e-2}
    hidden = (75, 50, 25)
    train_size = 1797 - math.ceil(0.2 * 1797)  # train_test_split rounds the test size up

    def data(self, seed: int) -> Data:
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError as e:  # the optional [demo] dependency
            raise RuntimeError("the digits task needs scikit-learn: pip install scikit-learn") from e
        x, y = load_digits(return_X_y=True)
        x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
        keep = x_tr.std(0) > 0
        x_tr, x_va = x_tr[:, keep], x_va[:, keep]
        mean, std = x_tr.mean(0), x_tr.std(0)

        def feats(a: np.ndarray) -> Tensor:
            return torch.tensor((a - mean) / std, dtype=torch.float32)

        return Data(feats(x_tr), torch.tensor(y_tr), feats(x_va), torch.tensor(y_va))

    def model(self, config: TrainConfig, data: Data) -> nn.Module:
        act = ACTIVATIONS[config.activation]
        sizes = (data.x_train.shape[1], *self.hidden, 10)
        layers: list[tuple[str, nn.Module]] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            layers.append((f"fc{i}", nn.Linear(n_in, n_out)))
            if i < len(sizes) - 1:
                layers.append((f"act{i}", act()))
        return nn.Sequential(OrderedDict(layers))

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return nn.functional.cross_entropy(output, target)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Data) -> dict[str, float]:
        model.eval()
        out_tr, out_va = model(data.x_train), model(data.x_val)
        model.train()
        return {
            "train_loss": float(self.loss(out_tr, data.y_train)),
            "val_loss": float(self.loss(out_va, data.y_val)),
            "train_accuracy": float((out_tr.argmax(1) == data.y_train).double().mean()),
            "val_accuracy": float((out_va.argmax(1) == data.y_val).double().mean()),
        }


class PVFinderTask(Task):
    """Primary-vertex finding on generated LHCb-like events (see `instrumented_adam.demo.pvfinder`).

    Data: `n_train` + `n_val` events from the toy generator (seeded by the run's seed; the
    validation events from an independent stream), each the tracks' KDE on `n_bins` bins over
    [−100, 300] mm — 1000 bins of 0.4 mm by default for CPU speed, where PV-finder publishes
    4000 of 0.1 mm — and the target histogram with its cost mask. Model: ``architecture``
    "allcnn" (`AllCNN1d`) or "unet" (`UNet1d`), scaled by `widths` (channels per layer; their
    number is the depth). Cost: `asymmetric_cost` with `asymmetry`. At each epoch end the
    validation histograms are searched for peaks (`find_peaks`) and matched to the true PVs
    (`match_vertices`): ``val_efficiency`` and ``val_false_positives`` (per event) are recorded
    next to the losses, with ``val_found`` and ``val_visible`` (their counts).

    The data set of the last seed is cached on the task, so that a demo training several
    optimizers generates it once.
    """

    description = "PV finding on generated LHCb-like events: KDE → 1D CNN → vertex histogram (asymmetric cost)"
    default_epochs = 20
    default_batch_size = 32
    default_lr = {"adam": 1e-3, "adamw": 1e-3, "adamax": 2e-3, "sgd": 1e-2, "rmsprop": 1e-3, "adagrad": 1e-2}
    #: Evaluation batch (events per forward pass) — bounds the memory of the full-set evaluation.
    eval_batch = 500

    def __init__(self, architecture: str = "allcnn", *, n_train: int = 2000, n_val: int = 500, n_bins: int = 1000,
                 widths: Sequence[int] | None = None, asymmetry: float = 2.0,
                 generator: Any = None, target: Any = None, peaks: Any = None,
                 progress: bool | None = None) -> None:
        from . import pvfinder

        if architecture not in ("allcnn", "unet"):
            raise ValueError(f"unknown architecture {architecture!r}; choose 'allcnn' or 'unet'")
        if min(n_train, n_val, n_bins) < 1:
            raise ValueError("n_train, n_val and n_bins must be positive")
        self.architecture = architecture
        self.name = "pvfinder" if architecture == "allcnn" else "pvfinder-unet"
        if architecture == "unet":
            self.description = self.description.replace("1D CNN", "1D U-Net")
        self.n_train, self.n_val, self.n_bins = n_train, n_val, n_bins
        self.train_size = n_train
        self.widths = tuple(widths) if widths is not None else None
        self.asymmetry = asymmetry
        self.generator = generator or pvfinder.GeneratorConfig()
        self.target = target or pvfinder.TargetConfig()
        self.peaks = peaks or pvfinder.PeakConfig()
        self.progress = progress
        self._cache: tuple[int, Data] | None = None

    def data(self, seed: int) -> Data:
        from .pvfinder import make_dataset

        if self._cache is not None and self._cache[0] == seed:
            return self._cache[1]
        x_train, y_train, _ = make_dataset(self.n_train, seed, self.n_bins, self.generator, self.target,
                                           progress=self.progress, desc=f"{self.name} training events")
        # The validation events come from another seed stream: never the same events as training.
        x_val, y_val, truth = make_dataset(self.n_val, seed + 1_000_003, self.n_bins, self.generator, self.target,
                                           progress=self.progress, desc=f"{self.name} validation events")
        data = PVData(x_train, y_train, x_val, y_val, val_truth=truth)
        self._cache = (seed, data)
        return data

    def model(self, config: TrainConfig, data: Data) -> nn.Module:
        from .pvfinder import AllCNN1d, UNet1d

        if self.architecture == "unet":
            return UNet1d(widths=self.widths or (16, 32, 64))
        widths = self.widths or (16, 16, 16, 16)
        kernels = (25, *([15] * (len(widths) - 1)))
        return AllCNN1d(widths=widths, kernels=kernels)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        from .pvfinder import asymmetric_cost

        return asymmetric_cost(output[:, 0], target[:, 0], target[:, 1], self.asymmetry)

    def _predict(self, model: nn.Module, x: Tensor) -> Tensor:
        return torch.cat([model(x[lo : lo + self.eval_batch]) for lo in range(0, len(x), self.eval_batch)])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Data) -> dict[str, float]:
        from .pvfinder import find_peaks, match_vertices

        model.eval()
        out_tr, out_va = self._predict(model, data.x_train), self._predict(model, data.x_val)
        model.train()
        metrics = {"train_loss": float(self.loss(out_tr, data.y_train)), "val_loss": float(self.loss(out_va, data.y_val))}
        truth = getattr(data, "val_truth", None)
        if truth is not None:
            event, z, _ = find_peaks(out_va[:, 0].double().numpy(), self.generator.z_range, self.peaks)
            counts = match_vertices(event, z, truth.event, truth.z, truth.visible, len(data.x_val), self.peaks.tolerance)
            metrics.update(val_efficiency=counts.efficiency, val_false_positives=counts.false_positives_per_event,
                           val_found=float(counts.found), val_visible=float(counts.visible))
        return metrics

    def run_hyperparameters(self, data: Data, model: nn.Module) -> dict[str, Any]:
        return {"pvfinder": {
            "architecture": self.architecture, "widths": list(self.widths) if self.widths else None,
            "n_train": self.n_train, "n_val": self.n_val, "n_bins": self.n_bins, "asymmetry": self.asymmetry,
            "generator": asdict(self.generator), "target": asdict(self.target), "peaks": asdict(self.peaks),
            "parameters": sum(p.numel() for p in model.parameters()),
        }, EPOCH_METRIC_PANELS_KEY: [{
            # A hint for the report: these epoch metrics belong on one figure, the physics
            # outcome next to the optimizer's figures.
            "title": "Vertex finding (validation events)",
            "metrics": {"val_efficiency": "efficiency", "val_false_positives": "false positives / event"},
        }]}


@dataclass(frozen=True)
class PVData(Data):
    """`Data` of the vertex-finding task, with the validation events' true vertices."""

    val_truth: Any = None


#: The built-in tasks by name.
TASKS: dict[str, Task] = {t.name: t for t in (LinearRegressionTask(), DigitsTask(), PVFinderTask("allcnn"),
                                              PVFinderTask("unet"))}

#: The tasks ``demo --task all`` runs: the fast ones (the vertex-finding tasks take minutes).
DEFAULT_DEMO_TASKS: tuple[str, ...] = ("linreg", "digits")


@dataclass
class RunResult:
    """What `train_task` returns: the run's id and name, its final metrics and the model."""

    run_id: int
    run_name: str
    task: str
    config: TrainConfig
    final: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    model: nn.Module | None = None


def make_optimizer(params: Any, config: TrainConfig) -> torch.optim.Optimizer:
    """The instrumented optimizer named by `config` (lr and weight decay already resolved)."""
    cls = OPTIMIZERS[config.optimizer]
    return cls(params, lr=config.lr, weight_decay=config.weight_decay, **optimizer_options(config))


def optimizer_options(config: TrainConfig) -> dict[str, Any]:
    """The options of `config` besides lr and weight decay that its optimizer takes (torch's
    defaults for the rest: Adagrad keeps its eps of 1e-10)."""
    if config.optimizer == "sgd":
        momentum = config.momentum or 0.0
        return dict(momentum=momentum, nesterov=config.nesterov and momentum > 0)
    if config.optimizer == "rmsprop":
        return dict(eps=config.eps, momentum=config.momentum or 0.0)
    if config.optimizer == "adagrad":
        return {}
    return dict(betas=config.betas, eps=config.eps, histogram_every=config.histogram_every)


def train_task(
    task: Task | str,
    config: TrainConfig,
    store: RunStore | str | Path,
    *,
    run_name: str | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_step: Callable[[], None] | None = None,
    step_every: int = 1,
) -> RunResult:
    """Trains `task` with the instrumented optimizer of `config` and records the run in `store`.

    Seeds torch with ``config.seed`` (model initialisation and batch order are reproducible).
    After each epoch the recorder's epoch row (figures + metrics, as returned by
    `Recorder.end_epoch`) is passed to `on_epoch`; `on_step` is called after every step (a
    progress bar). The run is marked failed in the store if training raises.
    """
    task = TASKS[task] if isinstance(task, str) else task
    config = task.resolve(config)
    torch.manual_seed(config.seed)
    data = task.data(config.seed)
    model = task.model(config, data)
    opt = make_optimizer(model.parameters(), config)
    sched = None
    if config.schedule == "cosine":
        # Per epoch, down to 1% of the initial lr: the last epochs take small steps, so the
        # minibatch noise settles and the linear regression lands on its least-squares solution.
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs, eta_min=config.lr * 0.01)
    hyper = {"task": task.name, "task_description": task.description, **asdict(config),
             **task.run_hyperparameters(data, model)}
    name = run_name or f"{task.name}-{config.optimizer}"
    rec = Recorder(opt, store, run_name=name, model=model, hyperparameters=hyper, seed=config.seed, step_every=step_every)
    generator = torch.Generator().manual_seed(config.seed)
    n = len(data.x_train)
    history: list[dict[str, float]] = []
    try:
        model.train()
        for _ in range(config.epochs):
            order = torch.randperm(n, generator=generator)
            for lo in range(0, n, config.batch_size):
                idx = order[lo : lo + config.batch_size]
                loss = task.loss(model(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if on_step is not None:
                    on_step()
            row = rec.end_epoch(**task.evaluate(model, data), **task.epoch_metrics(model))
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
            if sched is not None:
                sched.step()
    except BaseException:
        rec.close("failed")
        raise
    rec.close()
    return RunResult(rec.run_id, name, task.name, config, history[-1] if history else {}, history, model)


def steps_per_epoch(task: Task | str, config: TrainConfig) -> int:
    """Optimizer steps in one epoch of `task` under `config` (for progress bars)."""
    task = TASKS[task] if isinstance(task, str) else task
    config = task.resolve(config)
    return -(-task.train_size // config.batch_size)


__all__ = [
    "TASKS",
    "OPTIMIZERS",
    "SCHEDULES",
    "ACTIVATIONS",
    "LOSS_SURFACE_KEY",
    "Data",
    "TrainConfig",
    "Task",
    "LinearModel",
    "LinearRegressionTask",
    "DigitsTask",
    "PVFinderTask",
    "PVData",
    "DEFAULT_DEMO_TASKS",
    "EPOCH_METRIC_PANELS_KEY",
    "RunResult",
    "make_optimizer",
    "optimizer_options",
    "train_task",
    "steps_per_epoch",
    "least_squares",
    "quadratic_mse",
]
