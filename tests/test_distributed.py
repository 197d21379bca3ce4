"""Recording under torch.distributed (2 gloo processes on CPU) and framework optimizer wrappers.

- DDP: one run in the store, written by rank 0; its rows equal a single-process run's (DDP's
  averaged gradients of two half-batches are the full batch's up to rounding, so the figures agree
  to a tolerance, and the optimizer states of the ranks agree bitwise).
- ``ranks="all"``: one run per rank, named ``<name>@rank<r>``.
- ``check_ranks=True``: a rank desynchronised on purpose is caught at the next epoch end
  (warned and recorded as ``rank_disagreement``; ``on_rank_mismatch="raise"`` raises).
- A checkpoint saved by rank 0 resumes on both ranks; only rank 0 touches the store (and the
  resumed run still equals the single-process one).
- Wrappers (ZeroRedundancyOptimizer's local optimizer, an Accelerate-style ``.optimizer``
  attribute, Lightning's ``._optimizer``) are unwrapped.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import instrumented_adam as ia
from instrumented_adam.telemetry.ranks import (
    RANK_DISAGREEMENT_METRIC,
    RankMismatchError,
    report_disagreement,
    unwrap_optimizer,
)
from instrumented_adam.telemetry.recorder import Recorder
from instrumented_adam.telemetry.store import RunStore

WORLD = 2
EPOCHS = 3
STEPS = 4


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _batch(epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * epoch + step)
    return torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)


def _worker(rank: int, init_file: str, store_path: str, scenario: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A bounded timeout: a rank whose peer failed must fail too, not wait in a collective forever.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = ia.Adam(model.parameters(), lr=1e-2)
        kwargs = {}
        if scenario == "all":
            kwargs["ranks"] = "all"
        if scenario == "check":
            kwargs.update(check_ranks=True)
        rec = Recorder(opt, store_path, "ddp", model=model, flush_every=2, **kwargs)
        caught: list[str] = []
        for epoch in range(EPOCHS):
            for step in range(STEPS):
                x, y = _batch(epoch, step)
                half = slice(rank * 4, rank * 4 + 4)  # each rank its half of the batch
                loss = torch.nn.functional.mse_loss(ddp(x[half]), y[half])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if scenario.startswith("check") and epoch == 1 and rank == 1:
                with torch.no_grad():  # desynchronise rank 1: its parameters drift from rank 0's
                    next(model.parameters()).add_(0.5)
            try:
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    rec.end_epoch(train_loss=loss.item())
                caught += [str(x.message) for x in w if "differ from rank 0" in str(x.message)]
            except RankMismatchError as e:
                caught.append("raised: " + str(e))
                break
            if epoch == 1 and scenario == "default":  # crash-free resume on every rank, mid-run
                path = rec.save_checkpoint(Path(out_dir) / "ckpt.pt")
                dist.barrier()  # rank 0 has written it
                rec.close()
                model2 = _model()
                ddp = torch.nn.parallel.DistributedDataParallel(model2)
                model = model2
                opt = ia.Adam(model2.parameters(), lr=1e-2)
                rec = Recorder.resume(path, opt, model2)
        rec.close()
        torch.save({"caught": caught, "state": opt.state_dict(), "active": rec.active,
                    "params": [p.detach().clone() for p in model.parameters()]},
                   Path(out_dir) / f"rank{rank}.pt")
        del ddp
    except BaseException:
        dist.destroy_process_group()
        raise
    _exit_cleanly()


def _exit_cleanly() -> None:
    """Ends a worker that finished: the process group goes, then the process exits at once.
    (At interpreter exit, gloo's destructor behind a DDP reducer sometimes waits forever for its
    worker threads, and mp.spawn then waits for the process.)"""
    dist.destroy_process_group()
    os._exit(0)


def _run(tmp_path: Path, scenario: str) -> tuple[Path, list[dict]]:
    store = tmp_path / "runs.sqlite"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(store), scenario, str(tmp_path)), nprocs=WORLD, join=True)
    return store, [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single_process_epochs(tmp_path: Path):
    model = _model()
    opt = ia.Adam(model.parameters(), lr=1e-2)
    with Recorder(opt, tmp_path / "single.sqlite", "single", model=model, flush_every=2) as rec:
        for epoch in range(EPOCHS):
            for step in range(STEPS):
                x, y = _batch(epoch, step)
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            rec.end_epoch(train_loss=loss.item())
    with RunStore(tmp_path / "single.sqlite") as store:
        return store.epochs(), store.steps()


@pytest.fixture(scope="module")
def ddp_default(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return tmp, *_run(tmp, "default")


def test_ddp_rank0_writes_one_run_equal_to_a_single_process_run(ddp_default):
    tmp, store_path, results = ddp_default
    with RunStore(store_path) as store:
        runs = store.runs()
        assert list(runs["name"]) == ["ddp"] and list(runs["status"]) == ["finished"]
        epochs, steps = store.epochs(), store.steps()
    assert [r["active"] for r in results] == [True, False]
    # Both ranks' optimizer states are the same bits: the inactive recorder kept rank 1's epochs.
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)
    s0, s1 = results[0]["state"]["state"], results[1]["state"]["state"]
    for k in s0:
        for name in s0[k]:
            assert torch.equal(torch.as_tensor(s0[k][name]), torch.as_tensor(s1[k][name])), name
    single_epochs, single_steps = _single_process_epochs(tmp)
    assert len(epochs) == EPOCHS and len(steps) == EPOCHS * STEPS
    for col in ("grad_norm", "update_norm", "step_norm", "cos_prev", "param_norm"):
        if col in steps:
            torch.testing.assert_close(torch.tensor(steps[col].to_numpy()), torch.tensor(single_steps[col].to_numpy()),
                                       rtol=1e-4, atol=1e-7, equal_nan=True)
        if col in epochs:
            torch.testing.assert_close(torch.tensor(epochs[col].to_numpy()), torch.tensor(single_epochs[col].to_numpy()),
                                       rtol=1e-4, atol=1e-7, equal_nan=True)


def test_ranks_all_records_one_run_per_rank(tmp_path):
    store_path, results = _run(tmp_path, "all")
    tables = []
    for path, name in ((store_path, "ddp@rank0"), (store_path.with_name("runs.rank1.sqlite"), "ddp@rank1")):
        with RunStore(path) as store:
            assert list(store.runs()["name"]) == [name]
            tables.append(store.epochs().reset_index(drop=True))
    assert all(r["active"] for r in results)
    a, b = tables
    # DDP keeps the ranks identical: the two runs' optimizer figures are the same numbers (their
    # losses differ: each rank evaluates its half of the batch).
    for col in ("step_norm", "distance_from_init", "param_norm", "grad_norm"):
        if col in a:
            assert a[col].equals(b[col]), col
    assert not a["train_loss"].equals(b["train_loss"])


def test_check_ranks_catches_a_desynchronised_rank(tmp_path):
    store_path, results = _run(tmp_path, "check")
    assert all(any("differ from rank 0" in m for m in r["caught"]) for r in results)
    with RunStore(store_path) as store:
        epochs = store.epochs()
    disagreement = epochs[RANK_DISAGREEMENT_METRIC].to_numpy()
    assert disagreement[0] == 0.0  # in sync until the perturbation
    assert disagreement[1] > 1e-3  # caught at the epoch end that follows it


def test_a_disagreement_can_raise():
    report_disagreement(3, 0.0, [], "raise")  # nothing to report
    with pytest.warns(RuntimeWarning, match=r"rank\(s\) \[1\] differ from rank 0's"):
        report_disagreement(3, 0.25, [1], "warn")
    with pytest.raises(RankMismatchError, match="epoch 3"):
        report_disagreement(3, 0.25, [1], "raise")


def test_resume_on_every_rank_only_rank0_touches_the_store(ddp_default):
    _, store_path, results = ddp_default  # the default scenario resumes from a checkpoint after epoch 1
    with RunStore(store_path) as store:
        runs = store.runs()
        assert len(runs) == 1 and runs["status"].iloc[0] == "finished"
        assert len(store.epochs()) == EPOCHS
        assert store.conn.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0] == 1
    assert (Path(store_path).parent / "ckpt.pt").exists()


class _AcceleratedLike(torch.optim.Optimizer):
    """The shape of Accelerate's AcceleratedOptimizer: an Optimizer holding `.optimizer`."""

    def __init__(self, optimizer):  # noqa: D107 - no Optimizer.__init__: it only forwards
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self, closure=None):
        return self.optimizer.step(closure)


class _LightningLike:
    def __init__(self, optimizer):
        self._optimizer = optimizer


def test_wrappers_are_unwrapped(tmp_path):
    model = _model()
    opt = ia.AdamW(model.parameters(), lr=1e-2)
    assert unwrap_optimizer(_AcceleratedLike(opt)) is opt
    assert unwrap_optimizer(_LightningLike(_AcceleratedLike(opt))) is opt
    plain = torch.optim.Adam(model.parameters())
    assert unwrap_optimizer(plain) is plain
    wrapped = _AcceleratedLike(opt)
    with Recorder(wrapped, tmp_path / "w.sqlite", "wrapped", model=model) as rec:
        assert rec.optimizer is opt
        x, y = _batch(0, 0)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        wrapped.step()  # the wrapper's step runs ours: the recorder's hook sees it
        rec.end_epoch(train_loss=loss.item())
    with RunStore(tmp_path / "w.sqlite") as store:
        assert len(store.steps()) == 1 and store.runs()["optimizer"].iloc[0] == "AdamW"
    with pytest.raises(TypeError, match="instrumented_adam optimizer"):
        Recorder(_AcceleratedLike(plain), tmp_path / "x.sqlite")


def _zero_worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    # A bounded timeout: a rank whose peer failed must fail too, not wait in a collective forever.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        model = _model()
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=ia.Adam, lr=1e-2)
        assert unwrap_optimizer(zero) is zero.optim
        # Rank 0 records (and says its figures are partial); rank 1 records nothing.
        with pytest.warns(RuntimeWarning, match="this rank's partition") if rank == 0 else contextlib.nullcontext():
            rec = Recorder(zero, Path(out) / "zero.sqlite", "zero", model=model)
        note = None
        if rec.active:
            note = rec.store.run_info(rec.run_id)["hyperparameters"]["figures_scope"]
        rec.close()
        torch.save({"local": type(unwrap_optimizer(zero)).__name__, "note": note}, Path(out) / f"zero{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    _exit_cleanly()


def test_zero_redundancy_optimizer_is_unwrapped_to_its_local_optimizer(tmp_path):
    mp.spawn(_zero_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"zero{r}.pt") for r in range(WORLD)]
    assert [r["local"] for r in results] == ["Adam", "Adam"]
    # Partial figures are recorded as what they are, not as the model's (global sums: not yet).
    assert "partition" in results[0]["note"] and results[1]["note"] is None


def test_bad_rank_options():
    model = _model()
    opt = ia.Adam(model.parameters())
    with pytest.raises(ValueError, match="ranks must be one of"):
        Recorder(opt, ":memory:", ranks="rank0")
    with pytest.raises(ValueError, match="on_rank_mismatch must be one of"):
        Recorder(opt, ":memory:", on_rank_mismatch="ignore")
