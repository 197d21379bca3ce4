"""The C++ step plan (csrc/step_plan.cpp): the eager CPU step of a param group whose parameters all
have gradients goes through lists kept on the C++ side, reading each .grad there. These tests pin
down when it is used, that it computes exactly what the op called with Python lists computes, and
that every case it does not take (a missing or sparse gradient, another layout, an option change,
an active dispatch mode) falls back to the general path with the general path's behaviour.
(Parity with torch over the option grids runs through it too: tests/test_parity.py.)"""

from __future__ import annotations

import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import instrumented_adam as ia

CLASSES = [ia.Adam, ia.AdamW, ia.Adamax]


def _model(seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape)) for shape in [(7, 5), (5,), (3, 4, 2), (1,), (33,)]]


def _grads(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def _plans(opt):
    return list(opt._ia.plans.values())


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_native_plan_is_used_and_matches_the_python_list_path(cls, monkeypatch):
    """Same parameters, state and statistics bits as the op called with Python lists (the plan
    disabled), over steps with an lr change, an epoch boundary (the previous-epoch dot joins) and
    amsgrad where the class has it."""
    kwargs = {"lr": 1e-2, "weight_decay": 0.01}
    if cls is not ia.Adamax:
        kwargs["amsgrad"] = True
    runs = {}
    for native in (True, False):
        params = _model()
        opt = cls(params, **kwargs)
        taken: list[bool] = []
        if native:  # a spy: which steps the plan took
            real = type(opt)._native_step
            monkeypatch.setattr(type(opt), "_native_step",
                                lambda self, *a, **k: taken.append(real(self, *a, **k)) or taken[-1])
        else:
            monkeypatch.setattr(type(opt), "_native_step", lambda self, *a, **k: False)
        stats = []
        for step in range(12):
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            if step == 5:
                opt.param_groups[0]["lr"] = 3e-3
            opt.step()
            stats.append(opt.last_step_statistics().values)
            if step % 4 == 3:
                opt.end_epoch()
        if native:  # every step but the first (which builds the plan) and those after end_epoch
            assert sum(taken) == 12 - 1 - 2, taken
        monkeypatch.undo()
        runs[native] = (params, opt, stats)
    (p1, o1, s1), (p2, o2, s2) = runs[True], runs[False]
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)
    for a, b in zip(p1, p2):
        for key, value in o1.state[a].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, o2.state[b][key]), key
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))
    assert s1[-1].abs().sum() > 0


def test_plan_does_not_keep_gradients_alive():
    """A gradient set to None after the step (zero_grad's default) is freed: the plan holds the
    gradients for one call only."""
    params = _model()
    opt = ia.Adam(params)
    for step in range(2):  # the first step builds the plan (general path), the second uses it
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        if step == 0:
            opt.step()
    del g  # the test's own last reference
    # Weak references to the gradients' storages (C++ objects: a Python weakref would only follow
    # the Python wrapper, which can go while C++ still holds the memory).
    refs = [StorageWeakRef(p.grad.untyped_storage()) for p in params]
    opt.step()
    assert all(plan.native is not None for plan in _plans(opt))
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r.expired() for r in refs)


def test_missing_gradient_falls_back_and_replans():
    """A parameter without a gradient at a later step: the plan path declines, the general path
    skips that parameter (zero statistics row, state untouched) exactly as without a plan."""
    params = _model()
    opt = ia.Adam(params, lr=1e-2)
    for step in range(3):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    frozen = params[2]
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[frozen].items()}
    value_before = frozen.detach().clone()
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, value_before)
    for key, value in before.items():
        assert torch.equal(opt.state[frozen][key], value), key
    frozen_row = opt.last_step_statistics().values[2]
    assert not frozen_row.any()
    # the group's plan now covers a subset: no C++ plan for it (stat rows are a subset)
    assert all(plan.native is None for plan in _plans(opt))
    frozen.grad = torch.ones_like(frozen)
    opt.step()  # back to all parameters: a C++ plan again
    assert all(plan.native is not None for plan in _plans(opt))


def test_sparse_gradient_keeps_torchs_message():
    params = _model()
    opt = ia.Adam(params)
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    opt.step()
    params[1].grad = params[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_gradient_in_another_layout_goes_through_the_general_path():
    """The plan declines a gradient whose strides differ from its parameter's (changing nothing);
    the general path then copies it into the parameter's layout."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 4))
    ref = torch.nn.Parameter(weight.detach().clone())
    ours, theirs = ia.Adam([weight], lr=1e-2), torch.optim.Adam([ref], lr=1e-2, fused=True)
    for step in range(4):
        g = torch.randn(4, 6)
        weight.grad = g.t() if step % 2 else g.t().contiguous()  # every other step transposed strides
        ref.grad = g.t().contiguous()
        ours.step()
        theirs.step()
    assert torch.equal(weight, ref)


def test_amsgrad_switched_on_later_replans(monkeypatch):
    """amsgrad turned on mid-run (torch's own Adam cannot: it fails on the missing state) takes
    the general path, which replans; the result is the general path's."""
    results = []
    for native in (True, False):
        params = _model()
        opt = ia.Adam(params, lr=1e-2)
        if not native:
            monkeypatch.setattr(ia.Adam, "_native_step", lambda self, *a, **k: False)
        for step in range(6):
            if step == 3:
                opt.param_groups[0]["amsgrad"] = True
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            opt.step()
        monkeypatch.undo()
        assert "max_exp_avg_sq" in opt.state[params[0]]
        results.append(params)
    for p, q in zip(*results):
        assert torch.equal(p, q)


def test_lr_tensor_through_the_plan():
    params = _model()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = ia.Adam(params, lr=torch.tensor(1e-2))
    theirs = torch.optim.Adam(ref, lr=torch.tensor(1e-2), fused=True)
    for step in range(5):
        for p, q, g in zip(params, ref, _grads(params, step)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert all(plan.native is not None for plan in _plans(ours))
    for p, q in zip(params, ref):
        assert torch.equal(p, q)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_an_active_dispatch_mode_sees_the_op():
    """The plan calls the kernel below the dispatcher's Python keys, so under a dispatch mode (a
    FLOP counter, a tracer) the step takes the general path and the mode sees adam_step."""
    params = _model()
    opt = ia.Adam(params)
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    opt.step()  # plan built
    mode = _RecordOps()
    with mode:
        opt.step()
    assert any("instrumented_adam.adam_step" in op for op in mode.ops), mode.ops
