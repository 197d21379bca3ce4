"""The functional layer (instrumented_adam.functional): the optimizers' step without an Optimizer.

It is what the classes call, so its fused path must give the classes' bits and statistics, and
torch's fused functional step's bits; callers that keep their own state (a ZeRO shard, a hook)
use its stat_rows, prev_epoch_steps, tensor lr and AMP arguments directly.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch.optim.adam import adam as torch_adam

import instrumented_adam as ia
from instrumented_adam import NUM_STATS, STAT_INDEX, functional

from conftest import ODD_SIZES, GradBank, make_params, set_grads

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8)


def _state(params, amsgrad=False):
    return dict(
        exp_avgs=[torch.zeros_like(p) for p in params],
        seconds=[torch.zeros_like(p) for p in params],
        maxes=[torch.zeros_like(p) for p in params] if amsgrad else [],
        steps=[torch.zeros((), dtype=torch.float32) for _ in params],
    )


def test_module_docstring_example_runs():
    """The example in the functional module's docstring, as written."""
    doc = functional.__doc__
    start = doc.index("    import torch")
    end = doc.index("\n\n", doc.index("functional.adam(", start))
    code = textwrap.dedent(doc[start:end])
    namespace: dict = {}
    exec(compile(code, "functional-docstring", "exec"), namespace)
    stats = namespace["stats"]
    assert stats.shape == (2, NUM_STATS)
    assert (stats[:, STAT_INDEX["update_sumsq"]] > 0).all()


def test_exported_names():
    import instrumented_adam.functional as by_import

    assert ia.functional is by_import is functional
    assert {"adam", "adamw", "adamax"} <= set(functional.__all__)


@pytest.mark.parametrize("name,kwargs", [
    ("Adam", dict(weight_decay=0.0)),
    ("Adam", dict(weight_decay=0.1, amsgrad=True, maximize=True)),
    ("AdamW", dict(weight_decay=0.1)),
    ("Adamax", dict(weight_decay=0.05)),
])
def test_same_bits_and_statistics_as_the_class(name, kwargs):
    """functional.adam/adamw/adamax on the caller's own lists == the optimizer class, bitwise,
    statistics included (the class is a planner around the same call)."""
    sizes = ODD_SIZES
    start = make_params(sizes)
    bank = GradBank(sizes)
    cls = {"Adam": ia.Adam, "AdamW": ia.AdamW, "Adamax": ia.Adamax}[name]
    ours = [p.clone() for p in start]
    opt = cls(ours, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"], **kwargs)
    params = [p.clone() for p in start]
    amsgrad = kwargs.get("amsgrad", False)
    st = _state(params, amsgrad)
    stats = torch.empty(len(params), NUM_STATS, dtype=torch.float64)
    fn_kwargs = {k: v for k, v in kwargs.items() if not (name == "Adamax" and k == "amsgrad")}
    for t in range(5):
        grads = bank.grads(t)
        set_grads(ours, grads, clone=True)
        opt.step()
        grads = [g.clone() for g in grads]
        if name == "Adamax":
            functional.adamax(params, grads, st["exp_avgs"], st["seconds"], st["steps"], stats=stats,
                              **HYPER, **fn_kwargs)
        else:
            fn = functional.adamw if name == "AdamW" else functional.adam
            fn(params, grads, st["exp_avgs"], st["seconds"], st["maxes"], st["steps"], stats=stats, **HYPER,
               **fn_kwargs)
        assert torch.equal(stats, opt.last_step_statistics().values), t
    second = "exp_inf" if name == "Adamax" else "exp_avg_sq"
    for i, p in enumerate(ours):
        assert torch.equal(p, params[i])
        assert torch.equal(opt.state[p]["exp_avg"], st["exp_avgs"][i])
        assert torch.equal(opt.state[p][second], st["seconds"][i])
        assert torch.equal(opt.state[p]["step"], st["steps"][i])


@pytest.mark.parametrize("amsgrad", [False, True])
def test_bitwise_with_torch_fused_functional(amsgrad):
    """The same lists through torch's fused functional adam: the same bits, statistics or not."""
    sizes = (7, 33, 1000)
    start = make_params(sizes)
    bank = GradBank(sizes)
    ours, theirs = [p.clone() for p in start], [p.clone() for p in start]
    so, st = _state(ours, amsgrad), _state(theirs, amsgrad)
    stats = torch.empty(len(ours), NUM_STATS, dtype=torch.float64)
    for t in range(4):
        grads = bank.grads(t)
        functional.adam(ours, [g.clone() for g in grads], so["exp_avgs"], so["seconds"], so["maxes"], so["steps"],
                        weight_decay=0.1, amsgrad=amsgrad, stats=stats if t % 2 else None, **HYPER)
        torch_adam(theirs, [g.clone() for g in grads], st["exp_avgs"], st["seconds"], st["maxes"], st["steps"],
                   fused=True, amsgrad=amsgrad, weight_decay=0.1, maximize=False, **HYPER)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    for key in ("exp_avgs", "seconds", "maxes"):
        for a, b in zip(so[key], st[key]):
            assert torch.equal(a, b), key


def test_lr_tensor_same_bits_as_float():
    sizes = (9, 100)
    start = make_params(sizes)
    grads = GradBank(sizes).grads(0)
    results = []
    for lr in (1e-2, torch.tensor(1e-2)):
        params = [p.clone() for p in start]
        st = _state(params)
        stats = torch.empty(len(params), NUM_STATS, dtype=torch.float64)
        functional.adam(params, [g.clone() for g in grads], st["exp_avgs"], st["seconds"], [], st["steps"],
                        lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, stats=stats)
        results.append((params, stats))
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b)
    assert torch.equal(results[0][1], results[1][1])


def test_shard_rows_and_previous_epoch_steps():
    """A caller that owns a subset of the rows (a ZeRO shard): stat_rows places each tensor's row,
    the other rows are zeroed; prev_epoch_steps feeds update_dot_prev_epoch."""
    params = make_params((5, 8))
    grads = [torch.randn_like(p) for p in params]
    prev = [torch.randn_like(p) for p in params]
    before = [p.clone() for p in params]
    st = _state(params)
    stats = torch.full((4, NUM_STATS), 7.0, dtype=torch.float64)
    functional.adam(params, grads, st["exp_avgs"], st["seconds"], [], st["steps"], weight_decay=0.0, **HYPER,
                    prev_epoch_steps=prev, stats=stats, stat_rows=[3, 1])
    assert (stats[[0, 2]] == 0).all()
    for row, p, b, s in ((3, params[0], before[0], prev[0]), (1, params[1], before[1], prev[1])):
        delta = (p - b).double()
        torch.testing.assert_close(stats[row, STAT_INDEX["update_sumsq"]], (delta * delta).sum(), rtol=1e-6, atol=0)
        torch.testing.assert_close(stats[row, STAT_INDEX["update_dot_prev_epoch"]], (delta * s.double()).sum(),
                                   rtol=1e-6, atol=1e-12)


def test_grad_scale_and_found_inf():
    """AMP: found_inf skips the whole step (nothing moves, steps stay, statistics zero);
    grad_scale unscales the gradients in place and steps as with the unscaled gradients."""
    params = make_params((6, 10))
    grads = [torch.randn_like(p) for p in params]
    st = _state(params)
    before = [p.clone() for p in params]
    stats = torch.full((2, NUM_STATS), 3.0, dtype=torch.float64)
    scale = torch.tensor(1024.0)
    scaled = [g * 1024.0 for g in grads]
    functional.adam(params, scaled, st["exp_avgs"], st["seconds"], [], st["steps"], weight_decay=0.0, **HYPER,
                    stats=stats, grad_scale=scale, found_inf=torch.tensor(1.0))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(s.item() == 0 for s in st["steps"]) and (stats == 0).all()

    reference = [p.clone() for p in params]
    ref_state = _state(reference)
    functional.adam(reference, [g.clone() for g in grads], ref_state["exp_avgs"], ref_state["seconds"], [],
                    ref_state["steps"], weight_decay=0.0, **HYPER)
    functional.adam(params, scaled, st["exp_avgs"], st["seconds"], [], st["steps"], weight_decay=0.0, **HYPER,
                    stats=stats, grad_scale=scale, found_inf=torch.tensor(0.0))
    for p, r, s, g in zip(params, reference, scaled, grads):
        assert torch.equal(p, r)
        assert torch.equal(s, g)  # unscaled in place (1024 is a power of two: exact)
    assert (stats[:, STAT_INDEX["update_sumsq"]] > 0).all()


def test_complex_tensors_as_real_pairs():
    """has_complex=True: complex tensors step as view_as_real pairs, as the classes do."""
    z = torch.randn(6, dtype=torch.complex64)
    g = torch.randn(6, dtype=torch.complex64)
    ours = [z.clone()]
    st = _state(ours)
    functional.adam(ours, [g.clone()], st["exp_avgs"], st["seconds"], [], st["steps"], weight_decay=0.0, **HYPER,
                    has_complex=True)
    opt_p = [z.clone()]
    opt = ia.Adam(opt_p, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]))
    opt_p[0].grad = g.clone()
    opt.step()
    assert torch.equal(ours[0], opt_p[0])
    with pytest.raises(RuntimeError, match="complex parameters are not supported"):
        functional.adam([z.clone()], [g.clone()], [torch.zeros_like(z)], [torch.zeros_like(z)], [],
                        [torch.zeros(())], weight_decay=0.0, **HYPER)


@pytest.mark.parametrize("bad,message", [
    (dict(lr=-0.1), "Invalid learning rate: -0.1"),
    (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    (dict(beta1=1.0), "Invalid beta parameter at index 0: 1.0"),
    (dict(beta2=-0.5), "Invalid beta parameter at index 1: -0.5"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
])
@pytest.mark.parametrize("differentiable", [False, True])
def test_hyperparameters_rejected_with_torch_messages(bad, message, differentiable):
    """torch.optim's constructor messages, checked before anything is touched."""
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0) | bad
    with pytest.raises(ValueError) as theirs:
        torch.optim.Adam([torch.randn(2)], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                         weight_decay=hp["weight_decay"])
    assert str(theirs.value) == message
    p = torch.randn(3)
    before = p.clone()
    st = _state([p])
    with pytest.raises(ValueError, match=f"^{message}$"):
        functional.adam([p], [torch.randn(3)], st["exp_avgs"], st["seconds"], [], st["steps"],
                        differentiable=differentiable, **hp)
    assert torch.equal(p, before) and st["steps"][0].item() == 0


@pytest.mark.parametrize("differentiable", [False, True])
def test_bad_lists_and_buffers_rejected(differentiable):
    p = torch.randn(3)
    st = _state([p])
    base = dict(weight_decay=0.0, differentiable=differentiable, **HYPER)
    with pytest.raises(RuntimeError, match="same length|has 0 tensors for 1 parameters"):
        functional.adam([p], [torch.randn(3)], [], st["seconds"], [], st["steps"], **base)
    with pytest.raises(RuntimeError, match="max_exp_avg_sq per parameter"):
        functional.adam([p], [torch.randn(3)], st["exp_avgs"], st["seconds"], [], st["steps"], amsgrad=True, **base)
    for stats in (torch.zeros(1, NUM_STATS), torch.zeros(2, NUM_STATS, dtype=torch.float64),
                  torch.zeros(1, NUM_STATS + 1, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match="stats"):
            functional.adam([p], [torch.randn(3)], st["exp_avgs"], st["seconds"], [], st["steps"], stats=stats,
                            **base)
    assert st["steps"][0].item() == 0


def test_differentiable_functional_equals_torch_and_measures():
    """differentiable=True through the functional layer: torch's differentiable functional step,
    bitwise, with a graph; the statistics equal the fused call's for a float64 step counter."""
    gen = torch.Generator().manual_seed(2)
    start = [torch.randn(11, generator=gen, dtype=torch.float64), torch.randn(3, 4, generator=gen, dtype=torch.float64)]
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in start]
    runs = {}
    for kind in ("ours", "torch", "fused"):
        leaves = [p.clone().requires_grad_() for p in start]
        params = [q.clone() for q in leaves] if kind != "fused" else [p.clone() for p in start]
        exp_avgs = [torch.zeros_like(p) for p in start]
        seconds = [torch.zeros_like(p) for p in start]
        maxes: list[torch.Tensor] = []
        steps = [torch.zeros((), dtype=torch.float64) for _ in start]
        stats = torch.empty(2, NUM_STATS, dtype=torch.float64)
        # amsgrad is not unrolled here: torch's max over two steps is not differentiable in place.
        kw = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=True)
        for _ in range(2):
            if kind == "torch":
                torch_adam(params, [g.clone() for g in grads], exp_avgs, seconds, maxes, steps, differentiable=True,
                           **kw)
            else:
                functional.adam(params, [g.clone() for g in grads], exp_avgs, seconds, maxes, steps, stats=stats,
                                differentiable=kind == "ours", **kw)
        runs[kind] = (leaves, params, stats)
    (leaves_o, params_o, stats_o), (leaves_t, params_t, _) = runs["ours"], runs["torch"]
    for a, b in zip(params_o, params_t):
        assert torch.equal(a, b) and a.grad_fn is not None
    g_o = torch.autograd.grad(sum((p**2).sum() for p in params_o), leaves_o)
    g_t = torch.autograd.grad(sum((p**2).sum() for p in params_t), leaves_t)
    assert all(torch.equal(a, b) for a, b in zip(g_o, g_t))
    stats_f = runs["fused"][2]
    torch.testing.assert_close(stats_o, stats_f, rtol=1e-6, atol=0)
