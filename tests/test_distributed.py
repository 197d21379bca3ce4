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
from instrumented_adam.telemetry.writer import AGGREGATES, EPOCH_FIGURES, STEP_FIGURES

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


# ---- sharded optimizers: ZeRO, FSDP1, FSDP2 ---------------------------------------------------
# Each rank trains on the same full batch, so the averaged gradient ((g + g) / 2, exact in float64)
# is the single process's: the parameters then agree to rounding, and every recorded figure
# depends only on how the shards' sums are combined. float64 models keep that within 1e-9.
SHARD_STEPS = 50
SHARD_EPOCH_EVERY = 10
SHARD_SCENARIOS = ("fsdp2", "fsdp1_orig", "fsdp1_flat", "zero")
HISTOGRAM_EVERY = 5  # histograms too are combined (their counts add over the shards)
#: The per-tensor norms whose squares add over the parameters a flat parameter holds.
_SUMSQ_NORMS = ("grad_norm", "update_norm", "param_norm", "step_norm")


def _shard_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Linear(8, 3): 27 elements, odd, so FSDP1 pads its flat parameter and FSDP2 shards it unevenly.
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def _shard_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return (torch.randn(8, 5, generator=g, dtype=torch.float64),
            torch.randn(8, 3, generator=g, dtype=torch.float64))


def _shard_features() -> dict[str, str | None]:
    """Why a scenario cannot run with this torch build (None: it can)."""
    reasons: dict[str, str | None] = dict.fromkeys(SHARD_SCENARIOS)
    if not dist.is_available():
        return dict.fromkeys(SHARD_SCENARIOS, "torch.distributed is not available")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        reasons["fsdp2"] = "this torch has no torch.distributed.fsdp.fully_shard (FSDP2)"
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: F401
    except ImportError:
        reasons["fsdp1_orig"] = reasons["fsdp1_flat"] = "this torch has no FullyShardedDataParallel"
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: F401
    except ImportError:
        reasons["zero"] = "this torch has no ZeroRedundancyOptimizer"
    return reasons


def _wrap(scenario: str, model: torch.nn.Module, make_opt):
    """(module to call, optimizer to step, wrapper given to the Recorder, full-parameters getter)."""
    if scenario == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model)
        opt = make_opt(model.parameters())
        return model, opt, opt, lambda: [p.full_tensor().clone() for p in model.parameters()]
    if scenario.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        kwargs = {"device_id": torch.device("cpu"), "use_orig_params": scenario == "fsdp1_orig"}
        model[0] = FSDP(model[0], **kwargs)
        fsdp = FSDP(model, **kwargs)
        opt = make_opt(fsdp.parameters())

        def full():
            with FSDP.summon_full_params(fsdp):
                return [p.detach().clone() for p in fsdp.parameters()]
        return fsdp, opt, opt, full
    from torch.distributed.optim import ZeroRedundancyOptimizer

    ddp = torch.nn.parallel.DistributedDataParallel(model)
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=make_opt, lr=1e-2)
    return ddp, zero, zero, lambda: [p.detach().clone() for p in model.parameters()]


def _train_shard(module, opt, end_epoch) -> None:
    for i in range(SHARD_STEPS):
        x, y = _shard_batch(i)
        loss = torch.nn.functional.mse_loss(module(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i % SHARD_EPOCH_EVERY == SHARD_EPOCH_EVERY - 1:
            end_epoch()


def _shard_worker(rank: int, init_file: str, out: str, scenarios: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {}
        for scenario in scenarios:
            zero = scenario == "zero"
            # Ours, recorded (ZeRO passes lr itself: the class is its optimizer_class).
            model = _shard_model()
            make = ((lambda params, **kw: ia.Adam(params, histogram_every=HISTOGRAM_EVERY, **kw)) if zero
                    else (lambda params: ia.Adam(params, lr=1e-2, histogram_every=HISTOGRAM_EVERY)))
            module, opt, wrapper, full = _wrap(scenario, model, make)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                rec = Recorder(wrapper, Path(out) / f"{scenario}.sqlite", scenario, model=model, flush_every=7)
            _train_shard(module, opt, lambda: rec.end_epoch())
            # Rank 0's file would hold its shard only: refused on every rank (none left waiting).
            with pytest.raises(RuntimeError, match="distributed checkpoint"):
                rec.save_checkpoint(Path(out) / f"{scenario}-{rank}.pt")
            rec.close()
            local = unwrap_optimizer(opt)
            state = local.state[next(p for g in local.param_groups for p in g["params"])]
            ours = full()
            # torch's Adam under the same wrapper (foreach; ZeRO: its default)
            model = _shard_model()
            make = ((lambda params, **kw: torch.optim.Adam(params, foreach=True, **kw)) if zero
                    else (lambda params: torch.optim.Adam(params, lr=1e-2, foreach=True)))
            module, topt, _, tfull = _wrap(scenario, model, make)
            _train_shard(module, topt, lambda: None)
            tlocal = topt.optim if zero else topt
            tstate = tlocal.state[next(p for g in tlocal.param_groups for p in g["params"])]
            interchange = None
            if scenario == "fsdp2":  # state_dicts load both ways, as between torch's Adams
                theirs = torch.optim.Adam(list(opt.param_groups[0]["params"]), lr=1e-2, foreach=True)
                theirs.load_state_dict(opt.state_dict())
                again = ia.Adam(list(topt.param_groups[0]["params"]), lr=1e-2)
                again.load_state_dict(topt.state_dict())
                interchange = all(
                    type(a.state[p][k]).__name__ == "DTensor"
                    and torch.equal(a.state[p][k].to_local(), b.state[p][k].to_local())
                    for a, b in ((theirs, opt), (again, topt))
                    for p in a.param_groups[0]["params"] for k in ("exp_avg", "exp_avg_sq"))
            results[scenario] = {
                "interchange": interchange,
                "ours": ours, "torch": tfull(), "active": rec.active,
                "warnings": [str(w.message) for w in caught],
                "state_types": {k: type(v).__name__ for k, v in state.items()},
                "torch_state_types": {k: type(v).__name__ for k, v in tstate.items()},
            }
        torch.save(results, Path(out) / f"shard{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    _exit_cleanly()


def _single_shard_run(path: Path) -> None:
    model = _shard_model()
    opt = ia.Adam(model.parameters(), lr=1e-2, histogram_every=HISTOGRAM_EVERY)
    with Recorder(opt, path, "single", model=model, flush_every=7) as rec:
        _train_shard(model, opt, lambda: rec.end_epoch())
    torch.save([p.detach().clone() for p in model.parameters()], path.with_suffix(".pt"))


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shard")
    reasons = _shard_features()
    scenarios = tuple(s for s in SHARD_SCENARIOS if reasons[s] is None)
    if scenarios:
        mp.spawn(_shard_worker, args=(str(tmp / "init"), str(tmp), scenarios), nprocs=WORLD, join=True)
    _single_shard_run(tmp / "single.sqlite")
    results = [torch.load(tmp / f"shard{r}.pt", weights_only=False) for r in range(WORLD)] if scenarios else [{}, {}]
    return tmp, reasons, results


def _assert_frames_close(a, b, columns, what: str) -> None:
    for col in columns:
        x = torch.tensor(a[col].to_numpy(dtype=float))
        y = torch.tensor(b[col].to_numpy(dtype=float))
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12, equal_nan=True, msg=lambda m: f"{what} {col}: {m}")


@pytest.mark.parametrize("scenario", SHARD_SCENARIOS)
def test_sharded_training_records_the_whole_models_figures(sharded_runs, scenario):
    tmp, reasons, results = sharded_runs
    if reasons[scenario] is not None:
        pytest.skip(reasons[scenario])
    mine = [r[scenario] for r in results]
    assert [r["active"] for r in mine] == [True, False]
    # No "partial figures" note any more: the figures are the whole model's.
    assert not any("partition" in w or "shards" in w for r in mine for w in r["warnings"])
    # Parameters: equal to one process's run of ours, and to torch's Adam under the same wrapper.
    single = torch.load(tmp / "single.pt")
    for r in mine:
        for a, b, t in zip(r["ours"], single, r["torch"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(a, t, rtol=1e-12, atol=1e-13)
    if scenario == "fsdp2":  # state tensors are DTensors, as torch's Adam makes them under FSDP2
        ours, theirs = mine[0]["state_types"], mine[0]["torch_state_types"]
        assert all(ours[k] == theirs[k] for k in theirs), (ours, theirs)
        assert ours["exp_avg"] == "DTensor" and ours["epoch_start_param"] == "DTensor"
        assert all(r["interchange"] for r in mine)
    with RunStore(tmp / f"{scenario}.sqlite") as store, RunStore(tmp / "single.sqlite") as ref:
        runs = store.runs()
        assert list(runs["name"]) == [scenario]
        assert "figures_scope" not in store.run_info(int(runs["run_id"].iloc[0]))["hyperparameters"]
        steps, epochs, layers = store.steps(), store.epochs(), store.layers()
        rsteps, repochs, rlayers = ref.steps(), ref.epochs(), ref.layers()
        hist, rhist = store.histograms(), ref.histograms()
    assert len(steps) == SHARD_STEPS and len(epochs) == SHARD_STEPS // SHARD_EPOCH_EVERY
    _assert_frames_close(steps, rsteps, STEP_FIGURES, "step rows")
    _assert_frames_close(epochs, repochs, (*EPOCH_FIGURES, *AGGREGATES), "epoch rows")
    # Histograms (every HISTOGRAM_EVERY steps): one per layer row and kind, as in one process.
    assert len(rhist) == SHARD_STEPS // HISTOGRAM_EVERY * 4 * 3
    assert len(hist) == len(rhist) * (2 if scenario == "fsdp1_flat" else 4) // 4
    key = ["step", "layer", "kind"]
    if scenario != "fsdp1_flat":  # the same histograms, count for count
        merged = hist.merge(rhist, on=key, suffixes=("", "_ref"))
        assert len(merged) == len(rhist) and merged["counts"].map(list).equals(merged["counts_ref"].map(list))
    else:  # a flat parameter's counts are its parameters' summed
        flat = hist.set_index(key)["counts"]
        for (step, layer, kind), counts in flat.items():
            parts = rhist[(rhist["step"] == step) & (rhist["kind"] == kind) & rhist["layer"].isin(layer.split("+"))]
            assert list(counts) == list(sum(parts["counts"].map(lambda c: c.astype("int64")))), (step, layer, kind)
    if scenario == "fsdp1_flat":
        # One row per flat parameter, named by the parameters it holds; its norms are theirs together.
        assert sorted(set(layers["layer"])) == ["0.weight+0.bias", "2.weight+2.bias"]
        for flat, names in (("0.weight+0.bias", ("0.weight", "0.bias")), ("2.weight+2.bias", ("2.weight", "2.bias"))):
            got = layers[layers["layer"] == flat].sort_values("epoch")
            parts = [rlayers[rlayers["layer"] == n].sort_values("epoch") for n in names]
            assert list(got["numel"]) == list(sum(p["numel"].to_numpy() for p in parts))  # FSDP's padding left out
            for col in _SUMSQ_NORMS:
                expect = sum(p[col].to_numpy() ** 2 for p in parts) ** 0.5
                torch.testing.assert_close(torch.tensor(got[col].to_numpy()), torch.tensor(expect), rtol=1e-9, atol=1e-12)
        return
    # Layer rows: every parameter, under the module's names, with the single process's figures.
    layers = layers.sort_values(["epoch", "layer_index"]).reset_index(drop=True)
    rlayers = rlayers.sort_values(["epoch", "layer_index"]).reset_index(drop=True)
    assert list(layers["layer"]) == list(rlayers["layer"])
    assert set(layers["layer"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert list(layers["numel"]) == list(rlayers["numel"])
    _assert_frames_close(layers, rlayers, (*EPOCH_FIGURES, *STEP_FIGURES), "layer rows")


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
        rec = Recorder(zero, Path(out) / "zero.sqlite", "zero", model=model)
        note = "no run"
        if rec.active:
            note = rec.store.run_info(rec.run_id)["hyperparameters"].get("figures_scope")
        rec.close()
        torch.save({"local": type(unwrap_optimizer(zero)).__name__, "note": note,
                    "combiner": rec._combiner.kind if rec._combiner is not None else None}, Path(out) / f"zero{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    _exit_cleanly()


def test_zero_redundancy_optimizer_is_unwrapped_to_its_local_optimizer(tmp_path):
    mp.spawn(_zero_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"zero{r}.pt") for r in range(WORLD)]
    assert [r["local"] for r in results] == ["Adam", "Adam"]
    # Both ranks combine their partitions' sums; rank 0 records them with no "partial" note.
    assert [r["combiner"] for r in results] == ["partition", "partition"]
    assert results[0]["note"] is None and results[1]["note"] == "no run"


def test_bad_rank_options():
    model = _model()
    opt = ia.Adam(model.parameters())
    with pytest.raises(ValueError, match="ranks must be one of"):
        Recorder(opt, ":memory:", ranks="rank0")
    with pytest.raises(ValueError, match="on_rank_mismatch must be one of"):
        Recorder(opt, ":memory:", on_rank_mismatch="ignore")
