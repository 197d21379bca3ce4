"""Learning-rate rules (core.lr_rules): decision logic on hand-made figures, the extrapolation
on a quadratic, bitwise rollback, bitwise save/load mid-run, no host sync per step, and the
decisions in the run store."""

from __future__ import annotations

import collections
import io
import math
import sqlite3

import pytest
import torch

import instrumented_adam as ia
from instrumented_adam.core.lr_rules import (GLOBAL, AlignedEpochLR, CarefulLR, EpochExtrapolation, EveLR,
                                             HypergradientLR)
from instrumented_adam.core.optimizer import EPOCH_START_KEY, INITIAL_PARAM_KEY, PREV_EPOCH_STEP_KEY
from instrumented_adam.core.stats import EPOCH_COLUMNS, EpochGeometry
from instrumented_adam.telemetry.recorder import Recorder
from instrumented_adam.telemetry.store import RunStore


def two_group_opt(lr: float = 1.0) -> torch.optim.Optimizer:
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    return ia.Adam([{"params": [a]}, {"params": [b]}], lr=lr)


def geometry(rows: list[tuple[float, float, float]], groups: list[int], epoch: int) -> EpochGeometry:
    """An EpochGeometry from (‖s_k‖², ⟨s_k, s_{k-1}⟩, ‖s_{k-1}‖²) per tensor."""
    assert EPOCH_COLUMNS[:3] == ("step_sumsq", "step_dot_prev", "prev_step_sumsq")
    values = torch.tensor([[*r, 0.0] for r in rows], dtype=torch.float64)
    return EpochGeometry(values=values, numel=torch.ones(len(rows), dtype=torch.float64),
                         groups=torch.tensor(groups), num_groups=max(groups) + 1, names=None, epoch=epoch,
                         has_previous=epoch > 0)


# ---- decision logic on hand-made figure sequences -------------------------------------------
def test_aligned_rule_on_aligned_and_oscillating_cosines():
    opt = two_group_opt(1.0)
    rule = AlignedEpochLR(opt, up=2.0, down=0.5, high=0.5, low=0.0, min_lr=0.25, max_lr=4.0)
    cosines = [math.nan, 0.9, 0.9, 0.9, -0.3, 0.2, -0.9, -0.9, -0.9, 0.6]
    lrs = []
    for epoch, c in enumerate(cosines):
        rule.step({"cos_prev": c, "epoch": epoch})
        lrs.append(rule.get_last_lr())
    #          nan  up   up   up(max) down hold down  down  down(min) up
    expected = [1.0, 2.0, 4.0, 4.0, 2.0, 2.0, 1.0, 0.5, 0.25, 0.5]
    assert lrs == [[lr, lr] for lr in expected]
    decisions = rule.pop_decisions()
    assert [d.action for d in decisions] == ["hold", "up", "up", "up", "down", "hold", "down", "down", "down", "up"]
    assert [d.lr_after for d in decisions] == expected and [d.epoch for d in decisions] == list(range(10))
    assert all(d.figure == "cos_prev" and d.group == GLOBAL for d in decisions)
    assert rule.pop_decisions() == []


def test_aligned_rule_per_group_reads_each_groups_cosine():
    opt = two_group_opt(1.0)
    rule = AlignedEpochLR(opt, up=2.0, down=0.5, per_group=True)
    # group 0 keeps its direction (cos 1), group 1 reverses it (cos -1), over three epochs
    for epoch in range(1, 4):
        rule.step(geometry([(1.0, 1.0, 1.0), (4.0, -4.0, 4.0)], [0, 1], epoch))
    assert rule.get_last_lr() == [8.0, 0.125]
    decisions = rule.pop_decisions()
    assert [(d.group, d.action) for d in decisions] == [(0, "up"), (1, "down")] * 3
    assert [d.value for d in decisions] == [1.0, -1.0] * 3
    with pytest.raises(ValueError, match="per_group=True"):
        rule.step({"cos_prev": 0.5})


def test_careful_rule_on_a_loss_sequence_with_a_jump():
    opt = two_group_opt(1.0)
    rule = CarefulLR(opt, factor=0.5, tolerance=0.1, grow=1.25, patience=2)
    losses = [1.0, 0.9, 0.8, 1.0, 1.05, math.nan, 1.0, 0.9, 0.8]
    lrs = []
    for loss in losses:
        rule.step(loss)
        lrs.append(rule.get_last_lr()[0])
    # 0.8 ends a run of 2 improvements: grow; 1.0 > 0.8·1.1: cut; 1.05 <= 1.0·1.1: accepted (no
    # improvement, the run restarts); NaN: cut, the reference stays 1.05; 1.0 and 0.9 improve: grow
    assert lrs == [1.0, 1.0, 1.25, 0.625, 0.625, 0.3125, 0.3125, 0.390625, 0.390625]
    assert [d.action for d in rule.pop_decisions()] == ["hold", "hold", "grow", "cut", "hold", "cut", "hold", "grow",
                                                        "hold"]


def test_bad_arguments_are_refused():
    opt = two_group_opt()
    with pytest.raises(ValueError, match="up >= 1"):
        AlignedEpochLR(opt, up=0.5)
    with pytest.raises(ValueError, match="low <= high"):
        AlignedEpochLR(opt, low=0.5, high=0.1)
    with pytest.raises(ValueError, match="factor"):
        CarefulLR(opt, factor=1.5)
    with pytest.raises(ValueError, match="strictly increasing"):
        EpochExtrapolation(opt, lambda: 0.0, alphas=(1.0, 0.5))
    with pytest.raises(TypeError, match="instrumented optimizer"):
        EpochExtrapolation(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), lambda: 0.0)
    with pytest.raises(ValueError, match="mode"):
        HypergradientLR(opt, mode="sideways")
    with pytest.raises(ValueError, match="min_lr"):
        EveLR(opt, min_lr=2.0, max_lr=1.0)


# ---- EpochExtrapolation on a quadratic -------------------------------------------------------
H = torch.tensor([4.0, 1.0, 0.25, 2.0], dtype=torch.float64)
C = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)


def quadratic(theta: torch.Tensor) -> torch.Tensor:
    return 0.5 * (H.to(theta.dtype) * (theta - C.to(theta.dtype)) ** 2).sum()


@pytest.mark.parametrize("epoch_buffers", ["exact", "compact"])
def test_extrapolation_finds_the_best_alpha_and_keeps_state_consistent(epoch_buffers):
    # compact: s_k is kept in bf16 (and θ₀ not at all); the jump moves along s_k as stored.
    theta = torch.nn.Parameter(torch.zeros(4))
    opt = ia.Adam([theta], lr=0.03, epoch_buffers=epoch_buffers)
    for _ in range(10):
        opt.zero_grad()
        quadratic(theta).backward()
        opt.step()
    opt.end_epoch()
    state = opt.state[theta]
    theta_k, s_k = theta.detach().clone(), state[PREV_EPOCH_STEP_KEY].clone()
    before = {k: v.clone() for k, v in state.items()}
    # The best α along s_k, independently: argmin of ½(θ+αs−c)ᵀH(θ+αs−c), in float64.
    t64, s64 = theta_k.double(), s_k.double()
    best = float(-(H * (t64 - C) * s64).sum() / (H * s64 * s64).sum())
    ladder = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    assert 0.25 < best < 8.0  # the test's setting: the optimum lies inside the ladder
    rule = EpochExtrapolation(opt, lambda: quadratic(theta), alphas=ladder)
    alpha = rule.step()
    closest = min(ladder, key=lambda a: float(quadratic(t64 + a * s64)))
    assert alpha == closest and best / 2 <= alpha <= best * 2, (alpha, best)
    assert rule.probe_evaluations == 1 + ladder.index(alpha) + 2  # α=0, the ladder up to one past the best
    # Parameters: θ_k + α·s_k (α a power of two: α·s_k is exact, the sum rounds once).
    expected = (t64 + alpha * s64).float()
    assert torch.equal(theta.detach(), expected)
    # Optimizer state: moments and step untouched; the epoch buffers follow the parameters.
    kept = ("exp_avg", "exp_avg_sq", "step") + ((INITIAL_PARAM_KEY,) if epoch_buffers == "exact" else ())
    assert (INITIAL_PARAM_KEY in state) == (epoch_buffers == "exact")
    for key in kept:
        assert torch.equal(state[key], before[key]), key
    assert torch.equal(state[EPOCH_START_KEY], expected)
    prev_dtype = torch.float32 if epoch_buffers == "exact" else torch.bfloat16
    assert torch.equal(state[PREV_EPOCH_STEP_KEY], ((1.0 + alpha) * s64).to(prev_dtype))
    decision = rule.pop_decisions()[0]
    assert decision.action == "jump" and decision.detail["alpha"] == alpha
    assert decision.detail["alphas"][: len(decision.detail["losses"])] == [0.0, *ladder[: len(decision.detail["losses"]) - 1]]
    # The next epoch is measured from where the parameters really are.
    for _ in range(3):
        opt.zero_grad()
        quadratic(theta).backward()
        opt.step()
    geo = opt.end_epoch()
    step = theta.detach().double() - expected.double()
    prev = ((1.0 + alpha) * s64).to(prev_dtype).double()  # as the buffer keeps it
    assert torch.allclose(geo["step_sumsq"], (step * step).sum()[None], rtol=1e-12, atol=0)
    assert torch.allclose(geo["step_dot_prev"], (step * prev).sum()[None], rtol=1e-12, atol=0)
    if epoch_buffers == "exact":
        distance = (theta.detach().double() - before[INITIAL_PARAM_KEY].double()).pow(2).sum()[None]
        assert torch.allclose(geo["distance_sumsq"], distance, rtol=1e-12, atol=0)
    else:  # no θ₀ kept: the distance is not measured (NaN), never a wrong number
        assert torch.isnan(geo["distance_sumsq"]).all()


def test_extrapolation_stays_when_the_loss_rises_and_refuses_mid_epoch():
    theta = torch.nn.Parameter(torch.zeros(4))
    opt = ia.Adam([theta], lr=0.5)  # long steps: past the minimum along s_k already
    for _ in range(20):
        opt.zero_grad()
        quadratic(theta).backward()
        opt.step()
    opt.end_epoch()
    theta_k = theta.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[theta].items()}
    rule = EpochExtrapolation(opt, lambda: quadratic(theta), alphas=(1.0, 2.0))
    probes = []
    rule.probe = lambda: probes.append(theta.detach().clone()) or quadratic(theta)
    if rule.step() == 0.0:
        assert torch.equal(theta.detach(), theta_k)
        assert all(torch.equal(v, state_before[k]) for k, v in opt.state[theta].items())
        assert rule.pop_decisions()[0].action == "stay"
    assert torch.equal(probes[0], theta_k)
    opt.zero_grad()
    quadratic(theta).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="right after end_epoch"):
        rule.step()


# ---- CarefulLR rollback --------------------------------------------------------------------
def make_task(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(64, 5)
    y = x[:, :1] * 2 - x[:, 1:2]
    return model, x, y


def train_epoch(model, opt, x, y, epoch: int, per_step=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + epoch)  # batches depend on the epoch only
    order = torch.randperm(len(x), generator=gen)
    for lo in range(0, len(x), 16):
        idx = order[lo : lo + 16]
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if per_step is not None:
            per_step(loss.detach())
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y)


def test_careful_rollback_restores_parameters_and_state_bitwise():
    model, x, y = make_task()
    opt = ia.AdamW(model.parameters(), lr=0.01)
    rule = CarefulLR(opt, factor=0.5, rollback=True)
    train_epoch(model, opt, x, y, 0)
    opt.end_epoch()
    rule.step(1.0)  # accepted: the snapshot of this epoch end
    params = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(model.parameters())}
    train_epoch(model, opt, x, y, 1)
    opt.end_epoch()
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    steps_done = opt.steps_done
    rule.step(5.0)  # a loss jump: cut and roll back
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p.detach(), q)
    for i, p in enumerate(model.parameters()):
        assert opt.state[p].keys() == state[i].keys()
        for k, v in state[i].items():
            assert torch.equal(opt.state[p][k], v), k
    assert rule.get_last_lr() == [0.005] and opt.steps_done == steps_done  # counters keep counting
    assert [d.action for d in rule.pop_decisions()] == ["hold", "rollback"]
    # Training goes on from the restored point: the next epoch step is measured from it.
    train_epoch(model, opt, x, y, 2)
    geo = opt.end_epoch()
    expected = sum(float((p.detach().double() - q.double()).pow(2).sum()) for p, q in zip(model.parameters(), params))
    assert math.isclose(float(geo.sums()["step_sumsq"][0]), expected, rel_tol=1e-12)


# ---- save/load mid-run continues bitwise, for every rule ------------------------------------
RULE_FACTORIES = {
    "aligned": lambda opt, model, x, y: AlignedEpochLR(opt, up=1.5, down=0.5, high=0.3, low=0.0),
    # grow=2 after every improvement: the lr soon overshoots, so the loss jumps and the rule acts
    "careful": lambda opt, model, x, y: CarefulLR(opt, factor=0.5, tolerance=0.0, grow=2.0, patience=1),
    "careful-rollback": lambda opt, model, x, y: CarefulLR(opt, factor=0.5, grow=2.0, patience=1, rollback=True),
    "extrapolation": lambda opt, model, x, y: EpochExtrapolation(
        opt, lambda: torch.nn.functional.mse_loss(model(x), y), scale_lr=True),
    "hypergradient": lambda opt, model, x, y: HypergradientLR(opt, hyper_lr=0.05),
    "eve": lambda opt, model, x, y: EveLR(opt, beta3=0.9),
}


def drive(name: str, epochs: int, state: dict | None = None, stop_at: int | None = None):
    """Runs `epochs` epochs of a rule; optionally starts from a saved state, or stops and saves."""
    model, x, y = make_task()
    opt = ia.Adam(model.parameters(), lr=0.02)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"]
    rule = RULE_FACTORIES[name](opt, model, x, y)
    if state is not None:
        rule.load_state_dict(state["rule"])
    per_step = None
    if name == "hypergradient":
        per_step = lambda loss: rule.step()  # noqa: E731
    elif name == "eve":
        per_step = rule.step
    for epoch in range(start, epochs):
        if stop_at is not None and epoch == stop_at:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rule": rule.state_dict(),
                        "epoch": epoch}, buffer)
            buffer.seek(0)
            return torch.load(buffer, weights_only=True)
        val = train_epoch(model, opt, x, y, epoch, per_step)
        geo = opt.end_epoch()
        if name == "aligned":
            rule.step(geo)
        elif name.startswith("careful"):
            rule.step(val)
        elif name == "extrapolation":
            rule.step()
    return model, opt, rule


@pytest.mark.parametrize("name", sorted(RULE_FACTORIES))
def test_save_and_load_mid_run_continues_bitwise(name):
    model_a, opt_a, rule_a = drive(name, 6)
    saved = drive(name, 6, stop_at=3)
    model_b, opt_b, rule_b = drive(name, 6, state=saved)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        for k, v in opt_a.state[p].items():
            assert torch.equal(v, opt_b.state[q][k]), k
    assert rule_a.get_last_lr() == rule_b.get_last_lr()
    log_a = [repr(d) for d in rule_a.pop_decisions()]  # repr: NaN figures compare equal
    log_b = [repr(d) for d in rule_b.pop_decisions()]
    assert log_a[-len(log_b):] == log_b if name in ("hypergradient", "eve") else log_a == log_b
    if name == "careful-rollback":
        assert any("'rollback'" in d for d in log_a), "the run should exercise a rollback"
    if name in ("aligned", "careful"):
        assert any("'up'" in d or "'cut'" in d for d in log_a), "the run should change the lr"


# ---- no host synchronisation per step --------------------------------------------------------
def test_per_step_rules_are_device_ops_without_reads():
    from conftest import OpCounter

    model, x, y = make_task()
    opt = ia.Adam(model.parameters(), lr=0.01)
    hyper, eve = HypergradientLR(opt), EveLR(opt)
    counts = []
    for i in range(3):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with OpCounter(opt) as mode:
            hyper.step()
            eve.step(loss.detach())
        # Reading the optimizer's step counter (a CPU tensor: never a wait for the GPU) is allowed.
        counts.append(mode.counts(device_only=True))
    reads = ("_local_scalar_dense", "item", "is_nonzero", "aten.equal", "tolist")
    for c in counts:
        assert not any(r in op for op in c for r in reads), c
    assert counts[1] == counts[2]  # a fixed handful of ops per step
    assert sum(counts[2].values()) < 80
    assert torch.is_tensor(opt.param_groups[0]["lr"])  # the optimizer reads lr on the device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_per_step_rules_do_not_synchronise_on_cuda():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 1).cuda()
    opt = ia.Adam(model.parameters(), lr=0.01)
    hyper, eve = HypergradientLR(opt), EveLR(opt)
    x, y = torch.randn(32, 16, device="cuda"), torch.randn(32, 1, device="cuda")
    for i in range(4):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 1:  # after the first step's setup (plans, buffers)
            torch.cuda.set_sync_debug_mode("error")
        try:
            hyper.step()
            eve.step(loss.detach())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(math.isfinite(lr) for lr in hyper.get_last_lr())


# ---- decisions in the run store -------------------------------------------------------------
def test_the_recorder_writes_decisions_and_a_resume_truncates_them(tmp_path):
    model, x, y = make_task()
    opt = ia.Adam(model.parameters(), lr=0.02)
    rule = AlignedEpochLR(opt, up=1.5, down=0.5, high=0.3)
    path = tmp_path / "r.sqlite"
    rec = Recorder(opt, path, run_name="rules", model=model)
    rec.add_lr_rule(rule)
    lrs = []
    for epoch in range(4):
        train_epoch(model, opt, x, y, epoch)
        row = rec.end_epoch(val_loss=0.0)
        rule.step(row)
        lrs.append(rule.get_last_lr()[0])
        if epoch == 1:
            rec.save_checkpoint(tmp_path / "c1.pt")
    rec.close()
    store = RunStore(path)
    got = store.lr_decisions("rules")
    assert got["epoch"].tolist() == [0, 1, 2, 3] and got["lr_after"].tolist() == lrs
    assert got["rule"].eq("aligned").all() and got["figure"].eq("cos_prev").all()
    epochs = store.epochs("rules")
    assert epochs["lr"].tolist()[1:] == lrs[:-1]  # the lr in force in each next epoch
    store.close()
    # A resume from the checkpoint after epoch 1 keeps the decisions of epochs 0 and 1 only.
    model2, _, _ = make_task()
    opt2 = ia.Adam(model2.parameters(), lr=0.02)
    rec2 = Recorder.resume(tmp_path / "c1.pt", opt2, model2)
    rec2.close()
    assert RunStore(path).lr_decisions("rules")["epoch"].tolist() == [0, 1]


def test_an_existing_store_without_the_table_gains_it_when_opened_for_writing(tmp_path):
    path = tmp_path / "old.sqlite"
    with RunStore(path, create=True) as store:
        run = store.create_run("old")
        store.release_lease(run)
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE lr_decisions")
    conn.commit()
    conn.close()
    with RunStore(path, readonly=True) as store:  # a reader sees no decisions and changes nothing
        assert len(store.lr_decisions()) == 0
    with RunStore(path) as store:
        assert store.schema_version == 2
        store.acquire_lease(run)
        store.write_lr_decisions(run, [{"rule": "careful", "epoch": 0, "step": 5, "group": -1, "action": "cut",
                                        "lr_before": 1.0, "lr_after": 0.5, "figure": "loss", "value": 2.0,
                                        "detail": {"reference": 1.0}}])
        got = store.lr_decisions(run)
        assert got["detail"].tolist() == [{"reference": 1.0}] and got["lr_after"].tolist() == [0.5]


def test_the_report_shows_the_decisions(tmp_path):
    from instrumented_adam.analysis.report import build_report

    model, x, y = make_task()
    opt = ia.Adam(model.parameters(), lr=0.02)
    rule = CarefulLR(opt, factor=0.5, grow=2.0, patience=1, rollback=True)
    rec = Recorder(opt, tmp_path / "rep.sqlite", run_name="careful", model=model)
    rec.add_lr_rule(rule)
    for epoch in range(6):
        val = train_epoch(model, opt, x, y, epoch)
        rec.end_epoch(val_loss=float(val))
        rule.step(val)
    rec.close()
    page = build_report(tmp_path / "rep.sqlite", permutations=19)
    assert '<h2 id="lr-decisions">Learning-rate decisions</h2>' in page
    assert "rollback" in page and "<td>grow</td>" in page


# ---- the study -------------------------------------------------------------------------------
def test_bootstrap_and_reach_helpers():
    from instrumented_adam.demo.lr_study import bootstrap_ci, first_reach

    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    value, lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0, 100.0])
    assert value == 22.0 and 1.0 <= lo < value < hi <= 100.0
    median, lo, hi = bootstrap_ci([3.0, 4.0, math.inf], stat=__import__("numpy").median)
    assert median == 4.0 and lo == 3.0 and hi == math.inf  # an unreached seed widens the CI to ∞
    assert first_reach([3.0, 2.0, 1.0], 2.0) == 2 and first_reach([3.0], 1.0) is None


def test_the_study_runs_every_method_and_reports(tmp_path):
    from instrumented_adam.demo import lr_study

    seen = []
    results = lr_study.run_study(["linreg"], [0], epochs={"linreg": 4}, store=tmp_path / "s.sqlite",
                                 progress=lambda i, n, job: seen.append(job.method))
    assert seen == list(lr_study.METHODS) and all(len(r.val_loss) == 4 and len(r.lr) == 4 for r in results)
    by = {r.method: r for r in results}
    assert by["constant"].lr == [0.1] * 4 and by["exp-decay"].lr[1] < 0.1
    assert by["extrapolation"].probe_evaluations >= 2 * 4 and by["prodigy"].run_id is None
    with RunStore(tmp_path / "s.sqlite", readonly=True) as store:
        decisions = store.lr_decisions()
        assert set(decisions["rule"]) == {"aligned", "careful", "extrapolation", "hypergradient", "eve"}
        assert len(store.runs()) == len(lr_study.METHODS) - 1  # Prodigy is not instrumented
    # The lr in force that the study reports is what the store recorded for the run.
    with RunStore(tmp_path / "s.sqlite", readonly=True) as store:
        assert store.epochs(by["aligned"].run_id)["lr"].tolist() == pytest.approx(by["aligned"].lr, rel=1e-12)
    md = lr_study.write_study_report(results, tmp_path / "out", header="test")
    text = md.read_text()
    assert "### linreg" in text and "| hypergradient |" in text and "| prodigy |" in text
    assert (tmp_path / "out" / "study.png").stat().st_size > 0
    again = lr_study.load_results(tmp_path / "out" / "study.json")
    assert [r.val_loss for r in again] == [r.val_loss for r in results]
    with pytest.raises(ValueError, match="unknown method"):
        lr_study.study_jobs(["linreg"], [0], ["nope"])


def test_the_study_command(tmp_path, capsys):
    from instrumented_adam.demo.cli import main

    out = tmp_path / "study"
    args = ["study", "lr-rules", "--tasks", "linreg", "--seeds", "1", "--methods", "constant,careful",
            "--epochs", "linreg=3", "--target", "linreg=0.5", "--out", str(out)]
    assert main(args) == 0
    text = (out / "study.md").read_text()
    assert "target validation loss 0.5" in text and "| careful |" in text and "torch 2." in text
    assert main(args) == 1  # the store exists: refused, nothing overwritten
    assert main(["study", "lr-rules", "--methods", "nope", "--out", str(tmp_path / "x")]) == 1
    assert "unknown method" in capsys.readouterr().err
