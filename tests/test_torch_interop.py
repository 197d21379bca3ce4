"""What a torch.optim user meets when moving checkpoints between torch's optimizers and ours, and
an evaluation before the first step (issue 10, "found running nanoGPT with our AdamW")."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import instrumented_adam as ia


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        x = torch.randn(16, 7, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("cls, torch_cls", [(ia.Adam, torch.optim.Adam), (ia.AdamW, torch.optim.AdamW)])
def test_our_checkpoint_runs_torch_on_its_fused_path(cls, torch_cls):
    """Reproduction: our state_dict stored `fused: None`, so a checkpoint of ours loaded into
    torch.optim.AdamW (built fused=True as nanoGPT does, or plain) ran torch's *non-fused* path
    and drifted from what ours computes. The state_dict now says fused=True (the path whose
    numerics we follow), and torch continues bitwise as ours does."""
    model = _model()
    ours = cls(model.parameters(), lr=3e-3, weight_decay=0.1)
    _steps(model, ours, 20, seed=1)
    saved_params = {k: v.clone() for k, v in model.state_dict().items()}
    sd = copy.deepcopy(ours.state_dict())  # torch's load_state_dict keeps the tensors it is given
    assert all(group["fused"] is True for group in sd["param_groups"])

    twin = _model()
    twin.load_state_dict(saved_params)
    theirs = torch_cls(twin.parameters(), lr=1.0)  # every setting comes from the checkpoint
    theirs.load_state_dict(sd)
    assert theirs.param_groups[0]["fused"] is True
    _steps(model, ours, 15, seed=2)
    _steps(twin, theirs, 15, seed=2)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_differentiable_groups_do_not_claim_fused():
    p = torch.nn.Parameter(torch.randn(4))
    opt = ia.Adam([p], lr=1e-3, differentiable=True)
    assert opt.state_dict()["param_groups"][0]["fused"] in (None, False)


def test_end_epoch_before_any_step_is_a_no_op():
    """Reproduction: nanoGPT evaluates at iteration 0; end_epoch() before any step recorded an
    empty epoch (step norm 0), left the next epoch's angle empty (it became the 'first' epoch's
    successor of a zero step) and, after a resume, wiped the previous epoch's step."""
    model = _model()
    opt = ia.AdamW(model.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match="without a step"):
        assert opt.end_epoch() is None
    assert opt.epochs_done == 0
    _steps(model, opt, 5, seed=3)
    first = opt.end_epoch().derived()
    assert opt.epochs_done == 1 and torch.isnan(first["cos_prev"]).all()
    with pytest.warns(UserWarning, match="without a step"):
        assert opt.end_epoch() is None  # twice in a row: still one epoch
    _steps(model, opt, 5, seed=4)
    second = opt.end_epoch().derived()
    assert torch.isfinite(second["cos_prev"]).all()  # the angle to the first epoch's step exists

    # After a resume, an evaluation before the first new step keeps the previous epoch's step.
    sd = copy.deepcopy(opt.state_dict())
    resumed = ia.AdamW(model.parameters(), lr=1e-2)
    resumed.load_state_dict(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert resumed.end_epoch() is None
    _steps(model, resumed, 5, seed=5)
    third = resumed.end_epoch().derived()
    assert torch.isfinite(third["cos_prev"]).all() and float(third["prev_step_norm"]) > 0


def test_distance_from_init_after_a_torch_checkpoint_is_said_to_start_at_the_load(tmp_path):
    """After loading a torch.optim checkpoint θ₀ is the parameters at load time (the optimizer
    never saw the real initialisation): the run says so in the store, and `check` reports it."""
    from instrumented_adam.analysis.health import check_run
    from instrumented_adam.telemetry.recorder import Recorder
    from instrumented_adam.telemetry.store import THETA0_ORIGIN_KEY, RunStore

    model = _model()
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _steps(model, theirs, 30, seed=6)
    ours = ia.AdamW(model.parameters(), lr=1e-2)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    with Recorder(ours, tmp_path / "s.sqlite", run_name="continued", model=model) as rec:
        for _ in range(2):
            _steps(model, ours, 3, seed=7)
            rec.end_epoch(train_loss=1.0)
    with RunStore(tmp_path / "s.sqlite", readonly=True) as store:
        origin = store.run_info("continued")["hyperparameters"][THETA0_ORIGIN_KEY]
        assert "torch.optim checkpoint at step 30" in origin
        assert any(f.kind == "theta0_origin" for f in check_run(store, "continued").findings)

    # A run that starts from scratch carries no such note.
    fresh = _model()
    with Recorder(ia.AdamW(fresh.parameters(), lr=1e-2), tmp_path / "f.sqlite", run_name="fresh", model=fresh) as rec:
        _steps(fresh, rec.optimizer, 3, seed=8)
        rec.end_epoch(train_loss=1.0)
    with RunStore(tmp_path / "f.sqlite", readonly=True) as store:
        assert THETA0_ORIGIN_KEY not in store.run_info("fresh")["hyperparameters"]
