"""differentiable=True: autograd through our step is torch's, and the step is still measured.

A differentiable group steps with torch.optim's own single-tensor math (core.functional), so
gradients through `step()` are compared with torch.optim.Adam/AdamW/Adamax(differentiable=True)
bitwise. Its statistics come from the reference formulas (core.reference) and are compared with
the fused kernel's for the same inputs: to 1e-6 relative when both updates agree, i.e. with a
float64 step counter (torch's differentiable path computes the bias corrections in the step's
dtype; under a float64 default dtype torch and we create float64 steps). With a float32 step,
torch's own differentiable update differs from its fused one (1 − 0.999^t in float32 loses 4-5
digits at t = 1): the update figures then differ by that much, the others stay within 1e-6.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import instrumented_adam as ia
from instrumented_adam import STAT_NAMES

from conftest import OPTIMIZERS

REL = 1e-6
#: The statistics that depend on the applied update Δθ (or θ after it).
UPDATE_STATS = ("update_sumsq", "update_dot_grad", "update_dot_prev_epoch", "param_sumsq")

CONFIGS = {
    "adam": ("Adam", {}),
    "adam-wd": ("Adam", dict(weight_decay=0.1)),
    "adam-amsgrad": ("Adam", dict(weight_decay=0.1, amsgrad=True)),
    "adam-maximize": ("Adam", dict(weight_decay=0.1, maximize=True)),
    "adam-lr-tensor": ("Adam", dict(lr=torch.tensor(0.01))),
    "adamw-wd": ("AdamW", dict(weight_decay=0.1)),
    "adamw-amsgrad-maximize": ("AdamW", dict(weight_decay=0.1, amsgrad=True, maximize=True)),
    "adamw-lr-tensor": ("AdamW", dict(lr=torch.tensor(0.01), amsgrad=True)),
    "adamax": ("Adamax", {}),
    "adamax-wd-maximize": ("Adamax", dict(weight_decay=0.1, maximize=True)),
    "adamax-lr-tensor": ("Adamax", dict(lr=torch.tensor(0.01))),
}


def _kwargs(kwargs: dict, lr_requires_grad: bool = False) -> dict:
    """A fresh copy: a tensor lr is cloned (each optimizer needs its own) in the default dtype
    (torch's differentiable math computes AdamW's decay factor 1 − lr·λ in lr's dtype)."""
    out = dict(kwargs)
    if torch.is_tensor(out.get("lr")):
        out["lr"] = out["lr"].to(torch.get_default_dtype(), copy=True).requires_grad_(lr_requires_grad)
    return out


@pytest.fixture
def float64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


# ---- autograd through the step equals torch's ---------------------------------------------------

def _unrolled(cls, kwargs: dict, steps: int = 3):
    """A small meta-learning loop: θ0 and a loss weight w are leaves; `steps` optimizer steps on
    an inner loss whose gradient depends on both; an outer loss of the result and the state. Returns the outer loss and the leaves (θ0, w, and lr when it is a tensor)."""
    gen = torch.Generator().manual_seed(3)
    theta0 = torch.randn(13, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.rand(13, generator=gen, dtype=torch.float64).add_(0.5).requires_grad_()
    target = torch.randn(13, generator=gen, dtype=torch.float64)
    kw = _kwargs(kwargs, lr_requires_grad=True)
    p = theta0.clone()
    opt = cls([p], differentiable=True, **kw)
    for _ in range(steps):
        # The gradient of Σ w·(θ − target)² + 0.1·Σ(θ − target)³ / 3, written out: an autograd
        # graph of it would keep θ itself, which the next step updates in place.
        r = p - target
        p.grad = 2 * w * r + 0.1 * r * r
        opt.step()
    state = opt.state[p]
    second = state["exp_inf"] if "exp_inf" in state else state["exp_avg_sq"]
    outer = (p * target).sum() + state["exp_avg"].square().sum() + second.sum()
    leaves = [theta0, w] + ([kw["lr"]] if torch.is_tensor(kw.get("lr")) else [])
    return outer, leaves, p, opt


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_grad_through_step_equals_torch(config, steps):
    """Gradients of an outer loss through 1 or 3 of our steps w.r.t. θ0, the inner loss's weights
    and a tensor lr equal torch's bitwise. Where torch's math cannot do it (unrolling amsgrad's
    max or Adamax's infinity norm over several steps; Adamax with an lr that requires grad),
    ours fails with torch's error."""
    name, kwargs = CONFIGS[config]
    ours_cls, torch_cls = OPTIMIZERS[name]
    try:
        outer_torch, leaves_torch, p_torch, opt_torch = _unrolled(torch_cls, kwargs, steps)
    except TypeError as error:  # Adamax with an lr that requires grad: addcdiv_ takes a number
        assert name == "Adamax"
        with pytest.raises(TypeError, match=str(error).replace("(", r"\(").replace(")", r"\)")):
            _unrolled(ours_cls, kwargs, steps)
        return
    outer_ours, leaves_ours, p_ours, opt_ours = _unrolled(ours_cls, kwargs, steps)
    assert torch.equal(p_ours, p_torch)
    for key, value in opt_torch.state[p_torch].items():
        assert torch.equal(opt_ours.state[p_ours][key], value), key
    try:
        grads_torch = torch.autograd.grad(outer_torch, leaves_torch)
    except RuntimeError as error:
        assert steps > 1 and "modified by an inplace operation" in str(error)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(outer_ours, leaves_ours)
        return
    grads_ours = torch.autograd.grad(outer_ours, leaves_ours)
    assert len(grads_ours) == len(leaves_torch)
    for i, (a, b) in enumerate(zip(grads_ours, grads_torch)):
        assert a.abs().sum() > 0, f"leaf {i}: no gradient flowed"
        assert torch.equal(a, b), f"leaf {i}: max |diff| {(a - b).abs().max()}"
    # The step was measured too.
    derived = opt_ours.last_step_statistics().derived()
    assert math.isfinite(float(derived["update_norm"])) and float(derived["update_norm"]) > 0


def test_gradcheck_through_our_step():
    """torch's own check of a differentiable optimizer (test_optim's _diff_fn + gradcheck)."""
    p = torch.rand(6, dtype=torch.float64, requires_grad=True)
    grad = torch.rand(6, dtype=torch.float64, requires_grad=True)
    state = {"step": torch.tensor(10.0, dtype=torch.float64),
             "exp_avg": torch.rand(6, dtype=torch.float64, requires_grad=True),
             "exp_avg_sq": torch.rand(6, dtype=torch.float64, requires_grad=True),
             "max_exp_avg_sq": torch.rand(6, dtype=torch.float64, requires_grad=True)}
    kwargs = dict(lr=0.1, weight_decay=0.1, amsgrad=True, maximize=True, differentiable=True)
    assert torch.autograd.gradcheck(_diff_fn, (p, grad, state, ia.Adam, kwargs, *state.values()))


def _diff_fn(p, grad, opt_differentiable_state, opt_class, kwargs, *ignored):
    """As torch's test_optim.py: one step from the given state; outputs θ and the state that
    requires grad (the trailing state values make gradcheck see them as inputs)."""
    p = p.clone()
    p.grad = grad
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt_differentiable_state.items()}
    opt = opt_class([p], **kwargs)
    opt.state[p].update(state)
    opt.step()
    return (p,) + tuple(v for v in opt.state[p].values() if torch.is_tensor(v) and v.requires_grad)


def _torch_differentiable_configs():
    """torch's behavioural optimizer test database: its differentiable=True configurations."""
    common = pytest.importorskip("torch.testing._internal.common_optimizers")
    out = []
    for info in common.optim_db:
        name = info.optim_cls.__name__
        if name not in OPTIMIZERS or OPTIMIZERS[name][1] is not info.optim_cls:
            continue
        for optim_input in common._get_optim_inputs_including_global_cliquey_kwargs(
                "cpu", torch.float64, info, skip=("fused", "foreach")):
            if optim_input.kwargs.get("differentiable"):
                out.append(pytest.param(name, optim_input.kwargs, id=f"{name}-{optim_input.desc}"))
    return out


@pytest.mark.parametrize("name,kwargs", _torch_differentiable_configs())
def test_torch_optim_db_differentiable_configs(name, kwargs):
    """Every differentiable configuration of torch's optim_db (Adam, AdamW, Adamax on CPU):
    gradcheck through our step passes, and our outputs and their gradients equal torch's."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(5, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.rand(5, generator=gen, dtype=torch.float64, requires_grad=True)
    state = {"step": torch.tensor(10.0, dtype=torch.float64),
             "exp_avg": torch.rand(5, generator=gen, dtype=torch.float64, requires_grad=True)}
    if name == "Adamax":
        state["exp_inf"] = torch.rand(5, generator=gen, dtype=torch.float64, requires_grad=True)
    else:
        state["exp_avg_sq"] = torch.rand(5, generator=gen, dtype=torch.float64, requires_grad=True)
        if kwargs.get("amsgrad"):
            state["max_exp_avg_sq"] = torch.rand(5, generator=gen, dtype=torch.float64, requires_grad=True)
    inputs = (p, grad, state)
    assert torch.autograd.gradcheck(_diff_fn, (*inputs, ours_cls, kwargs, *state.values()))
    outs_ours = _diff_fn(*inputs, ours_cls, kwargs)
    outs_torch = _diff_fn(*inputs, torch_cls, kwargs)
    assert len(outs_ours) == len(outs_torch)
    for a, b in zip(outs_ours, outs_torch):
        assert torch.equal(a, b)
    leaves = [p, grad, *(v for v in state.values() if v.requires_grad)]
    weights = [torch.linspace(-1, 1, 5, dtype=torch.float64) * (k + 1) for k in range(len(outs_ours))]
    g_ours = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs_ours, weights)), leaves)
    g_torch = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs_torch, weights)), leaves)
    for a, b in zip(g_ours, g_torch):
        assert torch.equal(a, b)


def _torch_error_inputs():
    common = pytest.importorskip("torch.testing._internal.common_optimizers")
    out = []
    for info in common.optim_db:
        name = info.optim_cls.__name__
        if name not in OPTIMIZERS or OPTIMIZERS[name][1] is not info.optim_cls:
            continue
        for k, error_input in enumerate(info.optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            out.append(pytest.param(name, error_input, id=f"{name}-{k}-{error_input.optimizer_error_input.desc}"))
    return out


@pytest.mark.parametrize("name,error_input", _torch_error_inputs())
def test_torch_optim_db_error_inputs(name, error_input):
    """torch's optim_db error inputs for Adam, AdamW, Adamax (as its test_optim.test_errors runs
    them): our classes raise (or warn) the same way, at construction or at the step."""
    common = pytest.importorskip("torch.testing._internal.common_optimizers")
    cls = OPTIMIZERS[name][0]
    optim_input = error_input.optimizer_error_input

    def attempt():
        opt = cls(optim_input.params, **optim_input.kwargs)
        if error_input.error_on == common.OptimizerErrorEnum.STEP_ERROR:
            opt.step()

    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            attempt()
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            attempt()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", ["adam-amsgrad", "adamw-lr-tensor", "adamax-wd-maximize"])
def test_differentiable_on_cuda(config, float64_default):
    """On CUDA (the step counter on the device, unlike torch's CPU counter): the same update and
    gradients as torch's differentiable optimizer, statistics equal to the fused kernel's."""
    name, kwargs = CONFIGS[config]
    ours_cls, torch_cls = OPTIMIZERS[name]
    kw = _kwargs(kwargs)
    if torch.is_tensor(kw.get("lr")):
        kw["lr"] = kw["lr"].cuda()
    outs, stats = [], []
    for cls, differentiable in ((ours_cls, True), (torch_cls, True), (ours_cls, False)):
        gen = torch.Generator().manual_seed(4)
        leaf = torch.randn(1000, generator=gen).cuda().requires_grad_()
        p = leaf.clone() if differentiable else leaf.detach().clone()
        opt = cls([p], differentiable=differentiable, **kw)
        g = torch.randn(1000, generator=gen).cuda()
        p.grad = g * leaf if differentiable else g * leaf.detach()
        opt.step()
        outs.append((p, leaf))
        if isinstance(opt, ia.Adam | ia.AdamW | ia.Adamax):
            stats.append(opt.last_step_statistics().values)
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=0)
    grads = [torch.autograd.grad((p * p).sum(), leaf)[0] for p, leaf in outs[:2]]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)
    _assert_rows_close(stats[1].cpu(), stats[0].cpu(), STAT_NAMES, REL, "cuda")


def test_step_requires_grad_rejected_as_torch():
    p = torch.randn(3, dtype=torch.float64, requires_grad=True).clone()
    opt = ia.Adam([p], differentiable=True)
    opt.state[p].update({"step": torch.tensor(1.0, dtype=torch.float64, requires_grad=True),
                         "exp_avg": torch.zeros(3, dtype=torch.float64),
                         "exp_avg_sq": torch.zeros(3, dtype=torch.float64)})
    p.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="`requires_grad` is not supported for `step` in differentiable mode"):
        opt.step()


def test_fused_with_differentiable_rejected_as_torch():
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        ia.Adam([torch.randn(3)], fused=True, differentiable=True)


# ---- the statistics of a differentiable step ------------------------------------------------------

def _run_pair(name: str, kwargs: dict, dtype: torch.dtype, steps: int = 4):
    """The same training with differentiable=True and False: statistics and epoch rows of each.

    Several tensors (one complex, one without a gradient at step 2), an epoch boundary after step
    2 (so update_dot_prev_epoch is measured afterwards)."""
    cls = OPTIMIZERS[name][0]
    shapes = [(33,), (4, 5), (1,), (7,)]
    results = {}
    for differentiable in (False, True):
        gen = torch.Generator().manual_seed(11)
        params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
        params.append(torch.randn(6, generator=gen, dtype=dtype).to(torch.complex128 if dtype == torch.float64
                                                                       else torch.complex64))
        if differentiable:  # non-leaf parameters, as meta-learning code has them
            params = [q.requires_grad_().clone() for q in params]
        opt = cls(params, differentiable=differentiable, **_kwargs(kwargs))
        rows, epochs = [], []
        for t in range(steps):
            for i, q in enumerate(params):
                g = torch.randn(q.shape, generator=gen, dtype=q.dtype) * (1 + t)
                q.grad = None if (t == 1 and i == 1) else g
            opt.step()
            rows.append(opt.last_step_statistics())
            if t == 1:
                epochs.append(opt.end_epoch())
        epochs.append(opt.end_epoch())
        results[differentiable] = (rows, epochs, params, opt)
    return results


def _assert_rows_close(a: torch.Tensor, b: torch.Tensor, names, rel: float, where: str):
    for j, name in enumerate(names):
        x, y = a[:, j], b[:, j]
        # NaN where NaN (the compact default does not measure the distance from θ_0), close elsewhere.
        assert torch.equal(x.isnan(), y.isnan()), f"{where} {name}: NaN in one only\n{x}\n{y}"
        x, y = x[~x.isnan()], y[~y.isnan()]
        scale = x.abs().clamp_min(1e-300)
        worst = ((x - y).abs() / scale).max().item() if x.numel() else 0.0
        assert worst <= rel, f"{where} {name}: relative difference {worst:.2e} > {rel:.0e}\n{x}\n{y}"


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_statistics_equal_fused_path(config, float64_default):
    """float64 parameters and steps: every statistic and every epoch column of the differentiable
    step equals the fused kernel's to 1e-6 relative (in practice ~1e-15), per tensor and derived."""
    name, kwargs = CONFIGS[config]
    results = _run_pair(name, kwargs, torch.float64)
    (rows_f, epochs_f, params_f, _), (rows_d, epochs_d, params_d, opt_d) = results[False], results[True]
    assert opt_d.state[params_d[0]]["step"].dtype == torch.float64  # torch's differentiable layout
    for t, (a, b) in enumerate(zip(rows_f, rows_d)):
        assert torch.equal(a.numel, b.numel), t
        _assert_rows_close(a.values, b.values, STAT_NAMES, REL, f"step {t}")
        for level in ("tensor", "group", "overall"):
            da, db = a.derived(level), b.derived(level)
            assert list(da) == list(db)
            for key in da:
                torch.testing.assert_close(db[key], da[key], rtol=REL, atol=0, equal_nan=True, msg=key)
    assert (rows_d[-1].values[:, STAT_NAMES.index("update_dot_prev_epoch")] != 0).any()
    for a, b in zip(epochs_f, epochs_d):
        _assert_rows_close(a.values, b.values, a.columns, REL, "epoch")
    for a, b in zip(params_f, params_d):
        torch.testing.assert_close(b.detach(), a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("config", ["adam-amsgrad", "adamw-wd", "adamax-wd-maximize"])
def test_statistics_float32_step(config):
    """float32 parameters and torch's float32 step: our update is torch's differentiable update
    bitwise; the statistics that do not depend on it match the fused kernel's to 1e-6, and the
    update figures by as much as torch's two paths themselves differ."""
    name, kwargs = CONFIGS[config]
    results = _run_pair(name, kwargs, torch.float32, steps=3)
    (rows_f, _, _, _), (rows_d, _, params_d, _) = results[False], results[True]
    other = [n for n in STAT_NAMES if n not in UPDATE_STATS]
    cols = [STAT_NAMES.index(n) for n in other]
    for t, (a, b) in enumerate(zip(rows_f, rows_d)):
        _assert_rows_close(a.values[:, cols], b.values[:, cols], other, REL, f"step {t}")
        ucols = [STAT_NAMES.index(n) for n in ("update_sumsq", "update_dot_grad")]
        _assert_rows_close(a.values[:, ucols], b.values[:, ucols], ("update_sumsq", "update_dot_grad"), 1e-3,
                           f"step {t}")

    # The same run with torch's differentiable optimizer: bitwise our parameters.
    gen = torch.Generator().manual_seed(11)
    shapes = [(33,), (4, 5), (1,), (7,)]
    params = [torch.randn(s, generator=gen, dtype=torch.float32) for s in shapes]
    params.append(torch.randn(6, generator=gen, dtype=torch.float32).to(torch.complex64))
    params = [q.requires_grad_().clone() for q in params]
    opt = OPTIMIZERS[name][1](params, differentiable=True, **_kwargs(kwargs))
    for t in range(3):
        for i, q in enumerate(params):
            g = torch.randn(q.shape, generator=gen, dtype=q.dtype) * (1 + t)
            q.grad = None if (t == 1 and i == 1) else g
        opt.step()
    for a, b in zip(params_d, params):
        assert torch.equal(a, b)


def test_mixed_groups_rows(float64_default):
    """A differentiable optimizer with a second, non-differentiable group: each group's rows land
    where the layout puts them, equal to an all-fused optimizer's."""
    def build(differentiable):
        gen = torch.Generator().manual_seed(5)
        a = [torch.randn(9, generator=gen), torch.randn(3, generator=gen)]
        b = [torch.randn(4, generator=gen), torch.randn(8, generator=gen)]
        if differentiable:
            a = [q.requires_grad_().clone() for q in a]
        groups = [{"params": a}, {"params": b, "differentiable": False, "lr": 0.05}]
        return ia.Adam(groups, lr=0.01, differentiable=differentiable), a + b

    (opt_f, ps_f), (opt_d, ps_d) = build(False), build(True)
    gen = torch.Generator().manual_seed(6)
    for t in range(2):
        grads = [torch.randn(q.shape, generator=gen) for q in ps_f]
        for q, r, g in zip(ps_f, ps_d, grads):
            q.grad, r.grad = g.clone(), g.clone()
        opt_f.step()
        opt_d.step()
        a, b = opt_f.last_step_statistics(), opt_d.last_step_statistics()
        _assert_rows_close(a.values, b.values, STAT_NAMES, REL, f"step {t}")
    assert ps_d[0].grad_fn is not None and ps_d[2].grad_fn is None


def test_grad_scaler_unscales_before_a_differentiable_step():
    """torch's differentiable math does not unscale gradients: GradScaler then does it first, as
    for torch.optim's non-fused optimizers; the fused classes keep taking grad_scale/found_inf."""
    assert ia.Adam([torch.randn(2)])._step_supports_amp_scaling is True
    assert ia.Adam([torch.randn(2)], differentiable=True)._step_supports_amp_scaling is False
    results = []
    for cls in (ia.Adam, torch.optim.Adam):
        p = torch.ones(5, requires_grad=True).clone()  # differentiable steps need a non-leaf
        opt = cls([p], lr=0.1, differentiable=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for _ in range(2):
            p.grad = torch.autograd.grad(scaler.scale((p * torch.arange(5.0)).sum()), p)[0]
            scaler.step(opt)
            scaler.update()
        results.append(p.detach().clone())
    assert torch.equal(*results)
    assert not torch.equal(results[0], torch.ones(5))


# ---- checkpoints --------------------------------------------------------------------------------

def test_state_dict_round_trip():
    """A differentiable optimizer's checkpoint (torch.save / torch.load) resumes bitwise in ours
    (differentiable or not) and in torch.optim.Adam(differentiable=True), counters included."""
    def grads(t):
        gen = torch.Generator().manual_seed(100 + t)
        return [torch.randn(10, generator=gen), torch.randn(2, 3, generator=gen)]

    def model():
        gen = torch.Generator().manual_seed(1)
        return [torch.randn(10, generator=gen), torch.randn(2, 3, generator=gen)]

    params = model()
    opt = ia.Adam(params, lr=0.01, amsgrad=True, differentiable=True)
    for t in range(3):
        for q, g in zip(params, grads(t)):
            q.grad = g
        opt.step()
        if t == 1:
            opt.end_epoch()
    buffer = io.BytesIO()
    torch.save({"params": params, "optim": opt.state_dict()}, buffer)
    for t in range(3, 5):  # the uninterrupted run
        for q, g in zip(params, grads(t)):
            q.grad = g
        opt.step()

    for cls, extra in ((ia.Adam, dict(differentiable=True)), (ia.Adam, {}), (torch.optim.Adam, dict(differentiable=True))):
        buffer.seek(0)
        saved = torch.load(buffer)
        resumed_params = saved["params"]
        resumed = cls(resumed_params, lr=0.01, amsgrad=True, **extra)
        resumed.load_state_dict(saved["optim"])
        if isinstance(resumed, ia.Adam):
            assert (resumed.steps_done, resumed.epochs_done) == (3, 1)
        for t in range(3, 5):
            for q, g in zip(resumed_params, grads(t)):
                q.grad = g
            resumed.step()
        for a, b in zip(params, resumed_params):
            if extra:  # the same math: bitwise
                assert torch.equal(a, b), cls
            else:  # the fused kernel from a differentiable checkpoint: close (torch's paths differ)
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        if isinstance(resumed, ia.Adam):
            assert resumed.last_step_statistics().step == 5


def test_recorder_rows_of_a_differentiable_optimizer(tmp_path):
    """The recorder needs nothing special: its step and epoch rows carry the differentiable
    step's figures (the same as last_step_statistics / end_epoch give)."""
    from instrumented_adam.telemetry.recorder import Recorder
    from instrumented_adam.telemetry.store import RunStore

    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(12, generator=gen).requires_grad_().clone(), torch.randn(3, 5, generator=gen)]
    opt = ia.AdamW(params, lr=1e-2, weight_decay=0.1, differentiable=True)
    rec = Recorder(opt, tmp_path / "d.sqlite", run_name="d", flush_every=3)
    expected = []
    for epoch in range(2):
        for _ in range(4):
            for q in params:
                q.grad = torch.randn(q.shape, generator=gen)
            opt.step()
            expected.append(float(opt.last_step_statistics().derived()["update_norm"][0]))
        rec.end_epoch()
    rec.close()
    steps = RunStore(tmp_path / "d.sqlite").steps("d")
    assert steps["step"].tolist() == list(range(1, 9))
    assert steps["update_norm"].tolist() == pytest.approx(expected, rel=1e-12)
    assert params[0].grad_fn is not None
