"""Inputs the kernel cannot take as they are: clear errors, or handling that is documented here.

| input                                  | handling                                                      |
| -------------------------------------- | ------------------------------------------------------------- |
| sparse gradient                        | RuntimeError, torch.optim's own message                       |
| complex parameter                      | updated as view_as_real pairs, as torch.optim does            |
| parameters on several devices          | ValueError at the first step: one optimizer per device        |
| all parameters on the meta device      | shape-only no-op (as any op on meta tensors)                  |
| mixed dtypes in one group              | supported: each tensor in its own dtype                       |
| invalid hyperparameters                | torch.optim's constructor validation and messages             |
| state_dict of another optimizer/model  | ValueError before anything is loaded                          |
| non-contiguous parameter               | updated in place in the same tensor (dense layouts directly,  |
|                                        | others through a contiguous copy)                             |
| gradient strides ≠ parameter strides   | the gradient is copied into the parameter's layout            |
| state strides ≠ parameter strides      | (a loaded checkpoint) re-laid out like the parameter          |
| parameter without gradient             | skipped: zero statistics row, state untouched                 |
| lr as a tensor of 2 elements           | ValueError (constructor) / RuntimeError (step), state intact  |
| differentiable=True                    | torch's differentiable math, reference statistics             |
|                                        | (test_differentiable.py)                                      |
| integer parameters                     | RuntimeError at the first step                                |
"""

from __future__ import annotations

import copy

import pytest
import torch

import instrumented_adam as ia

from conftest import OPTIMIZERS, GradBank, make_params, set_grads

ALL = ["Adam", "AdamW", "Adamax"]


def messages_of(fn_ours, fn_torch, error=Exception):
    with pytest.raises(error) as ours:
        fn_ours()
    with pytest.raises(error) as theirs:
        fn_torch()
    return ours.value, theirs.value


# ---- sparse ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("when", ["first-step", "later-step"])
def test_sparse_gradient_same_error_as_torch(name, when):
    ours_cls, torch_cls = OPTIMIZERS[name]

    def attempt(cls):
        p = torch.randn(6)
        opt = cls([p], lr=1e-2)
        if when == "later-step":
            p.grad = torch.randn(6)
            opt.step()
        p.grad = torch.randn(6).to_sparse()
        before = p.clone()
        try:
            opt.step()
        finally:
            assert torch.equal(p, before)

    ours, theirs = messages_of(lambda: attempt(ours_cls), lambda: attempt(torch_cls), RuntimeError)
    assert str(ours) == str(theirs)


# ---- complex --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_complex_parameters_follow_torch(name):
    """Complex parameters (with a real one in the same group) against torch.optim's for-loop path,
    which also updates view_as_real(p). Measured max |diff| after 50 steps: Adam 6e-8, AdamW 3e-8,
    Adamax 0 (the for-loop path rounds differently from the fused form: a few fp32 ulp).
    The statistics treat a complex element as two reals."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(17, dtype=torch.complex64, generator=gen)
    r = torch.randn(9, generator=gen)
    ours_p, theirs_p = [z.clone(), r.clone()], [z.clone(), r.clone()]
    kwargs = dict(lr=1e-2, weight_decay=0.01)
    ours = ours_cls(ours_p, **kwargs)
    theirs = torch_cls(theirs_p, foreach=False, **kwargs)
    for _ in range(50):
        grads = [torch.randn(17, dtype=torch.complex64, generator=gen), torch.randn(9, generator=gen)]
        set_grads(ours_p, grads)
        set_grads(theirs_p, grads)
        ours.step()
        theirs.step()
    for p, q in zip(ours_p, theirs_p):
        assert p.dtype == q.dtype
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.state[p]["exp_avg"], theirs.state[q]["exp_avg"], rtol=1e-5, atol=1e-7)
    stats = ours.last_step_statistics()
    g = torch.view_as_real(ours_p[0].grad).double()
    assert stats["grad_sumsq"][0].item() == pytest.approx(float((g * g).sum()), rel=1e-6)
    assert stats.sums("tensor")["numel"][0].item() == 17  # elements of the parameter (complex)
    geometry = ours.end_epoch()
    assert geometry.values[0, 0] > 0


# ---- devices --------------------------------------------------------------------------------------

def test_parameters_on_two_devices():
    """CPU + meta in one optimizer: a ValueError naming the devices (the only second device here)."""
    a, b = torch.randn(3), torch.randn(3, device="meta")
    a.grad, b.grad = torch.randn(3), torch.randn(3, device="meta")
    opt = ia.Adam([dict(params=[a]), dict(params=[b])])
    with pytest.raises(ValueError, match=r"one device, got \['cpu', 'meta'\]; use one optimizer per device"):
        opt.step()
    assert opt.state.get(a) is None or float(opt.state[a]["step"]) == 0


def test_all_parameters_on_meta_is_a_shape_only_noop():
    """On the meta device (no data) the op runs its fake kernel: the step traces shapes only.

    (torch.optim.Adam(fused=True) refuses meta tensors; ours is usable for deferred-init dry runs.)
    """
    p = torch.randn(3, device="meta")
    p.grad = torch.randn(3, device="meta")
    opt = ia.Adam([p])
    opt.step()
    assert opt.state[p]["exp_avg"].device.type == "meta"
    assert opt.last_step_statistics().values.device.type == "meta"


# ---- dtypes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_mixed_dtypes_in_one_group(name):
    """fp32, fp64, bf16 and fp16 parameters in one group: each exactly as in a run of its dtype alone."""
    ours_cls = OPTIMIZERS[name][0]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float32]
    sizes = [17, 9, 33, 25, 1000]
    base = [make_params([n], dt, seed=i)[0] for i, (n, dt) in enumerate(zip(sizes, dtypes))]
    mixed = [p.clone() for p in base]
    alone = [p.clone() for p in base]
    kwargs = dict(lr=1e-2, weight_decay=0.01)
    opt_mixed = ours_cls(mixed, **kwargs)
    opt_alone = [ours_cls([p], **kwargs) for p in alone]
    bank = GradBank(sizes)
    for t in range(20):
        grads = [g.to(dt) for g, dt in zip(bank.grads(t), dtypes)]
        set_grads(mixed, grads)
        set_grads(alone, grads)
        opt_mixed.step()
        for o in opt_alone:
            o.step()
    stats = opt_mixed.last_step_statistics().values
    for i, (p, q) in enumerate(zip(mixed, alone)):
        assert p.dtype == dtypes[i] and torch.equal(p, q), dtypes[i]
        for k, v in opt_alone[i].state[q].items():
            assert torch.equal(opt_mixed.state[p][k], v), (dtypes[i], k)
        assert torch.equal(stats[i], opt_alone[i].last_step_statistics().values[0])


def test_integer_parameters_rejected_at_step():
    p = torch.ones(3, dtype=torch.int32)
    p.grad = torch.ones(3, dtype=torch.int32)
    opt = ia.Adam([p])
    with pytest.raises(RuntimeError, match="parameters must be float32, float64, bfloat16 or float16, got Int"):
        opt.step()
    assert torch.equal(p, torch.ones(3, dtype=torch.int32))


# ---- hyperparameters ------------------------------------------------------------------------------

INVALID = [
    dict(lr=-1e-3),
    dict(eps=-1.0),
    dict(betas=(1.0, 0.999)),
    dict(betas=(-0.1, 0.999)),
    dict(betas=(0.9, 1.0)),
    dict(weight_decay=-0.1),
    dict(lr=torch.tensor([1e-3, 2e-3])),
    dict(betas=(0.9, torch.tensor(0.999))),
    dict(fused=True, foreach=True),
]


@pytest.mark.parametrize("kwargs", INVALID, ids=lambda k: ",".join(f"{a}={b!r}" for a, b in k.items()))
@pytest.mark.parametrize("name", ALL)
def test_invalid_hyperparameters_same_message_as_torch(name, kwargs):
    ours_cls, torch_cls = OPTIMIZERS[name]
    if name == "Adamax" and "fused" in kwargs:
        pytest.skip("torch.optim.Adamax has no fused argument")
    def outcome(cls):
        try:
            cls([torch.randn(3)], **kwargs)
        except Exception as error:  # noqa: BLE001 - the comparison is the point
            return type(error), str(error)
        return None

    theirs = outcome(torch_cls)
    assert outcome(ours_cls) == theirs
    if theirs is None:  # torch.optim.Adamax accepts a tensor beta2 with a float beta1: so do we
        p = torch.randn(3)
        p.grad = torch.ones(3)
        ours_cls([p], **kwargs).step()


def test_lr_tensor_with_two_elements_set_later():
    """A 2-element lr put into a group after construction: a RuntimeError before anything moves."""
    p = torch.randn(4)
    opt = ia.Adam([p], lr=1e-2)
    p.grad = torch.randn(4)
    opt.step()
    before = copy.deepcopy(opt.state[p])
    theta = p.clone()
    opt.param_groups[0]["lr"] = torch.tensor([1e-3, 2e-3])
    with pytest.raises(RuntimeError, match=r"lr must be a one-element CPU tensor, got shape \[2\]"):
        opt.step()
    assert torch.equal(p, theta)
    for k, v in before.items():
        assert torch.equal(opt.state[p][k], v), k
    assert opt.steps_done == 1


@pytest.mark.parametrize("name", ALL)
def test_differentiable_accepted(name):
    """differentiable=True steps like torch's differentiable optimizer (bitwise, with a graph) and
    is measured; test_differentiable.py checks gradients, statistics and checkpoints in depth."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    results, optimizers = [], []
    for cls in (ours_cls, torch_cls):
        p = torch.linspace(-1, 1, 5, requires_grad=True).clone()
        opt = cls([p], lr=1e-2, differentiable=True)
        p.grad = torch.linspace(0.5, -2, 5)
        opt.step()
        assert p.grad_fn is not None
        results.append(p)
        optimizers.append(opt)
    assert torch.equal(*results)
    assert (optimizers[0].last_step_statistics().values != 0).any()


# ---- state_dict of something else -----------------------------------------------------------------

def test_state_dict_from_sgd_rejected():
    p = torch.randn(4)
    p.grad = torch.randn(4)
    for sgd in (torch.optim.SGD([p], lr=0.1), torch.optim.SGD([p], lr=0.1, momentum=0.9)):
        sgd.step()
        opt = ia.Adam([p])
        groups_before = copy.deepcopy(opt.param_groups[0]["betas"])
        with pytest.raises(ValueError, match="not saved by Adam or torch.optim.Adam"):
            opt.load_state_dict(sgd.state_dict())
        assert opt.param_groups[0]["betas"] == groups_before  # nothing was loaded
        opt.step()  # still usable


def test_state_dict_of_adam_into_adamax_rejected():
    p = torch.randn(4)
    p.grad = torch.randn(4)
    adam = torch.optim.Adam([p])
    adam.step()
    with pytest.raises(ValueError, match=r"not saved by Adamax.*lacks \['exp_inf'\]"):
        ia.Adamax([p]).load_state_dict(adam.state_dict())


def test_state_dict_with_mismatched_shapes_rejected():
    a, b = torch.randn(4, 3), torch.randn(5)
    for p in (a, b):
        p.grad = torch.randn_like(p)
    source = ia.Adam([a, b])
    source.step()
    state_dict = source.state_dict()
    with pytest.raises(ValueError, match=r"state 'exp_avg' has shape \(4, 3\) but its parameter has shape \(3, 4\)"):
        ia.Adam([torch.randn(3, 4), torch.randn(5)]).load_state_dict(state_dict)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        ia.Adam([dict(params=[torch.randn(4, 3)]), dict(params=[torch.randn(5)])]).load_state_dict(state_dict)
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):
        ia.Adam([torch.randn(4, 3)]).load_state_dict(state_dict)
    with pytest.raises(ValueError, match="not an optimizer state_dict"):
        ia.Adam([a, b]).load_state_dict({"params": []})


# ---- layouts --------------------------------------------------------------------------------------

def contiguous_twin(p: torch.Tensor) -> torch.Tensor:
    return p.detach().clone(memory_format=torch.contiguous_format)


@pytest.mark.parametrize("name", ALL)
def test_non_contiguous_parameters_updated_in_place(name):
    """A transposed parameter (dense, walked in storage order) and a strided slice (not dense,
    updated through a contiguous copy) stay the same tensor objects over the same storage, and their
    values equal those of a run on contiguous copies, epoch buffers included. Sizes are multiples of
    8 elements, so every element takes the same SIMD path in either order and equality is bitwise."""
    ours_cls = OPTIMIZERS[name][0]
    base_t = torch.randn(4, 6)
    transposed = base_t.t()  # (6, 4), strides (1, 6)
    base_s = torch.randn(8, 10)
    sliced = base_s[:, ::2]  # (8, 5), strides (10, 2): not dense
    twins = [contiguous_twin(transposed), contiguous_twin(sliced)]
    ours = ours_cls([transposed, sliced], lr=1e-2, weight_decay=0.01)
    ref = ours_cls(twins, lr=1e-2, weight_decay=0.01)
    ids = [(id(transposed), transposed.data_ptr(), transposed.stride()), (id(sliced), sliced.data_ptr(), sliced.stride())]
    gen = torch.Generator().manual_seed(0)
    for t in range(10):
        grads = [torch.randn(6, 4, generator=gen), torch.randn(8, 5, generator=gen)]
        set_grads([transposed, sliced], grads)
        set_grads(twins, grads)
        ours.step()
        ref.step()
        if t == 4:
            ours.end_epoch()
            ref.end_epoch()
    assert [(id(p), p.data_ptr(), p.stride()) for p in (transposed, sliced)] == ids
    assert torch.equal(base_t.t(), twins[0]) and torch.equal(base_s[:, ::2], twins[1])
    # The transposed parameter is summed in storage order, its twin in logical order: the sums
    # agree to their fp32-partial accuracy (the statistics tolerance, 1e-6), not bitwise.
    torch.testing.assert_close(ours.last_step_statistics().values, ref.last_step_statistics().values,
                               rtol=1e-6, atol=1e-12)
    for p, q in zip((transposed, sliced), twins):
        for k, v in ref.state[q].items():
            assert torch.equal(ours.state[p][k], v), k
    assert ours.state[transposed]["exp_avg"].stride() == transposed.stride()  # same layout as θ


@pytest.mark.parametrize("with_scale", [False, True], ids=["plain", "grad_scale"])
def test_gradient_with_other_strides(with_scale):
    """A gradient laid out differently from its parameter is read through a copy in the parameter's
    layout; with AMP's grad_scale the unscaled gradient is written back into the original tensor."""
    p = torch.randn(8, 6)
    q = p.clone()
    ours, ref = ia.Adam([p], lr=1e-2), ia.Adam([q], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        g = torch.randn(6, 8, generator=gen)
        expected = g.t() / 4 if with_scale else g.t().clone()
        p.grad = g.t()  # strides (1, 8) against the parameter's (6, 1)
        q.grad = g.t().contiguous()
        if with_scale:
            for opt in (ours, ref):  # what GradScaler.step sets on an optimizer that unscales itself
                opt.grad_scale = torch.tensor(4.0)
                opt.found_inf = torch.tensor(0.0)
        ours.step()
        ref.step()
        assert torch.equal(p, q)
        assert torch.equal(p.grad, q.grad)  # unscaled in place (or untouched)
        assert torch.equal(p.grad, expected)
        assert p.grad.stride() == (1, 8)
    assert torch.equal(ours.last_step_statistics().values, ref.last_step_statistics().values)


def test_checkpoint_state_in_another_layout():
    """State saved from a contiguous parameter, loaded for a transposed one (e.g. a model converted
    to another memory format): the state is re-laid out like the parameter and the run continues
    exactly like one on contiguous tensors."""
    base = torch.randn(4, 6)
    contiguous = base.t().contiguous()
    source = ia.Adam([contiguous], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        contiguous.grad = torch.randn(6, 4, generator=gen)
        source.step()
    state_dict = copy.deepcopy(source.state_dict())
    transposed = contiguous.detach().t().contiguous().t()  # same values, strides (1, 6)
    assert transposed.stride() != contiguous.stride()
    opt = ia.Adam([transposed], lr=1e-2)
    opt.load_state_dict(state_dict)
    for _ in range(5):
        g = torch.randn(6, 4, generator=gen)
        contiguous.grad = g
        transposed.grad = g.clone()
        source.step()
        opt.step()
    assert torch.equal(transposed, contiguous)
    for k, v in source.state[contiguous].items():
        assert torch.equal(opt.state[transposed][k], v), k
        if v.dim():
            assert opt.state[transposed][k].stride() == transposed.stride(), k


# ---- parameters without gradients -----------------------------------------------------------------

def test_parameters_without_gradients_are_skipped():
    params = make_params((7, 9, 33, 5))
    opt = ia.Adam([dict(params=params[:2]), dict(params=params[2:], amsgrad=True)], lr=1e-2)
    bank = GradBank((7, 9, 33, 5))
    grads = bank.grads(0)
    set_grads(params, grads)
    opt.step()
    # Step 2: params 1 and 3 without grads; group 0 keeps one param with a grad.
    snapshot = {i: (params[i].clone(), copy.deepcopy(opt.state[params[i]])) for i in (1, 3)}
    grads = bank.grads(1)
    for i, p in enumerate(params):
        p.grad = grads[i] if i in (0, 2) else None
    opt.step()
    stats = opt.last_step_statistics()
    for i in (1, 3):
        assert torch.all(stats.values[i] == 0)
        theta, state = snapshot[i]
        assert torch.equal(params[i], theta)
        for k, v in state.items():
            assert torch.equal(opt.state[params[i]][k], v), k
    assert torch.all(stats.values[[0, 2], 0] > 0)
    assert opt.state[params[0]]["step"].item() == 2 and opt.state[params[1]]["step"].item() == 1
    # A whole group without gradients, and a parameter that never had one: no state at all.
    fresh = torch.randn(3)
    opt.add_param_group(dict(params=[fresh]))
    for p in params:
        p.grad = None
    opt.step()
    assert torch.all(opt.last_step_statistics().values == 0)
    assert fresh not in opt.state
