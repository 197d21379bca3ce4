"""torch.compile with the optimizer as a module global (PyTorch's compiled-optimizer recipe):
the step's bookkeeping must not be a guard that changes every step.

Before the step counter became a tensor, `steps_done` (a Python int the step increments) was
guarded on its value: one recompile per step, and FailOnRecompileLimitHit at step 8 with
fullgraph=True. Now: 2 graphs over 50 steps (the first call builds the plan cache and the
statistics buffer), a bounded number with epoch ends between the steps, and the same with a
Recorder attached (its step hook is left out of the graph).
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


def test_fullgraph_with_a_recorder_says_why():
    # The hook cannot be in a full graph (its host bookkeeping); Dynamo says so, not a silent miss.
    with pytest.raises(Exception, match="(?i)skip|disable|graph break"):
        _train(3, None, fullgraph=True, recorder_path=":memory:")
