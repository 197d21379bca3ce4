"""torch.compile with the optimizer as a module global (PyTorch's compiled-optimizer recipe):
the step's bookkeeping must not be a guard that changes every step.

Before the step counter became a tensor, `steps_done` (a Python int the step increments) was
guarded on its value: one recompile per step, and FailOnRecompileLimitHit at step 8 with
fullgraph=True. Now: 2 graphs over 50 steps (the first call builds the plan cache and the
statistics buffer), a bounded number with epoch ends between the steps, and the same with a
Recorder attached: its step hook is one opaque op of the graph, so fullgraph=True works with it too.
A scheduler that changes lr and beta1 every step (OneCycleLR, with tensor lr and betas) does not
recompile either: the step's scalars reach the kernel as a tensor under compile.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

import instrumented_adam as ia
from instrumented_adam.telemetry.recorder import Recorder
from instrumented_adam.telemetry.store import RunStore


def _train(steps: int, epoch_every: int | None, fullgraph: bool, recorder_path=None):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt = ia.AdamW(model.parameters(), lr=torch.tensor(1e-2))
    rec = Recorder(opt, recorder_path, "compiled", model=model, flush_every=7) if recorder_path else None
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(fullgraph=fullgraph, backend=counter)
    def step():
        opt.step()

    for i in range(steps):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        step()
        opt.zero_grad()
        if epoch_every and i % epoch_every == epoch_every - 1:
            (rec or opt).end_epoch()
    if rec is not None:
        rec.close()
    return counter.frame_count, opt, model


def test_fullgraph_compiles_two_graphs_over_fifty_steps():
    frames, opt, _ = _train(50, None, fullgraph=True)
    assert frames <= 2
    assert opt.steps_done == 50


def test_epoch_ends_do_not_make_recompiles_grow():
    frames, opt, _ = _train(50, 10, fullgraph=True)
    # The first epoch end turns on the previous-epoch dot (a new plan); later ones change nothing.
    assert frames <= 4
    assert opt.steps_done == 50 and opt.epochs_done == 5


def test_compiled_steps_equal_eager_ones():
    _, compiled, compiled_model = _train(20, 5, fullgraph=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt = ia.AdamW(model.parameters(), lr=torch.tensor(1e-2))
    for i in range(20):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if i % 5 == 4:
            opt.end_epoch()
    for a, b in zip(compiled_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert compiled.steps_done == opt.steps_done == 20


def test_a_recorder_attached_records_every_compiled_step(tmp_path):
    frames, opt, _ = _train(30, 10, fullgraph=False, recorder_path=tmp_path / "c.sqlite")
    assert frames <= 6  # the hook's graph break splits the step: bounded, not one per step
    with RunStore(tmp_path / "c.sqlite") as store:
        steps, epochs = store.steps(), store.epochs()
    assert list(steps["step"]) == list(range(1, 31)) and len(epochs) == 3


def _recorded(path) -> tuple:
    with RunStore(path) as store:
        return store.steps(), store.epochs()


def _eager_recorded(tmp_path, steps: int, epoch_every: int | None):
    """The same training as `_train`, eager, recorded: the rows a compiled run must reproduce."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt = ia.AdamW(model.parameters(), lr=torch.tensor(1e-2))
    with Recorder(opt, tmp_path / "eager.sqlite", "eager", model=model, flush_every=7) as rec:
        for i in range(steps):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if epoch_every and i % epoch_every == epoch_every - 1:
                rec.end_epoch()
    return _recorded(tmp_path / "eager.sqlite")


def test_fullgraph_with_a_recorder_compiles_two_graphs_and_records_every_step(tmp_path):
    # The hook is one opaque op in the graph (record_step): no guard on the recorder's ring fill or
    # pending steps, so a module-global optimizer with a recorder compiles as without one.
    frames, opt, _ = _train(50, None, fullgraph=True, recorder_path=tmp_path / "c.sqlite")
    assert frames <= 2
    steps, _ = _recorded(tmp_path / "c.sqlite")
    assert list(steps["step"]) == list(range(1, 51))
    eager, _ = _eager_recorded(tmp_path, 50, None)
    for col in ("grad_norm", "update_norm", "param_norm", "eff_lr_mean", "eff_lr_max", "lr"):
        assert steps[col].tolist() == eager[col].tolist(), col  # the same bits as an eager run's rows


def test_fullgraph_with_a_recorder_and_epoch_ends(tmp_path):
    frames, opt, _ = _train(30, 10, fullgraph=True, recorder_path=tmp_path / "c.sqlite")
    assert frames <= 4  # as without a recorder: the first epoch end turns the previous-epoch dot on
    steps, epochs = _recorded(tmp_path / "c.sqlite")
    eager_steps, eager_epochs = _eager_recorded(tmp_path, 30, 10)
    assert list(steps["step"]) == list(range(1, 31)) and len(epochs) == 3
    for col in ("grad_norm", "update_norm", "cos_update_prev_epoch"):
        torch.testing.assert_close(torch.tensor(steps[col].to_numpy()), torch.tensor(eager_steps[col].to_numpy()),
                                   rtol=0, atol=0, equal_nan=True)
    for col in ("step_norm", "cos_prev", "grad_norm_mean"):
        torch.testing.assert_close(torch.tensor(epochs[col].to_numpy()), torch.tensor(eager_epochs[col].to_numpy()),
                                   rtol=0, atol=0, equal_nan=True)


def _one_cycle(compiled: bool, steps: int = 50):
    """Adam with tensor lr and betas under OneCycleLR (which also cycles beta1, as a Python float)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt = ia.Adam(model.parameters(), lr=torch.tensor(1e-3), betas=(torch.tensor(0.9), torch.tensor(0.999)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=torch.tensor(1e-2), total_steps=steps + 10)
    counter = torch._dynamo.testing.CompileCounter()

    def step():
        opt.step()

    run = torch.compile(step, backend=counter) if compiled else step
    for _ in range(steps):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        run()
        sched.step()
        opt.zero_grad()
    return counter.frame_count, model, opt


def test_one_cycle_lr_with_tensor_lr_and_betas_does_not_recompile_per_step():
    # A changing float argument of the op would be a constant of the graph (a guard per step):
    # under compile the step's scalars reach the kernel as a tensor (_ops.adam_step_tensor_scalars).
    frames, compiled_model, opt = _one_cycle(compiled=True)
    assert frames <= 2  # as torch.optim.Adam(fused=True) here (the scheduler's step wrapper breaks once)
    assert isinstance(opt.param_groups[0]["betas"][0], float)  # OneCycleLR did change beta1 per step
    _, eager_model, _ = _one_cycle(compiled=False)
    for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)
