"""The op under torch.library.opcheck, the optimizer under torch.compile, and AMP's GradScaler.

torch.compile and the step: Dynamo traces Adam.step of ours into the graph (fullgraph=True works):
the fused op has a fake kernel, and the Python bookkeeping (plans, statistics buffer, counters)
lives in a plain object because Dynamo drops attribute assignments made on an Optimizer inside a
compiled region (optimizer.py, _Bookkeeping). The tests check that a compiled step is bitwise the
eager one, statistics and epoch geometry included, and that a compiled training step (forward,
backward, step) with ours is bitwise the same compiled training step with torch's fused Adam.
"""

from __future__ import annotations

import pytest
import torch

import instrumented_adam as ia
from instrumented_adam.core._ops import NUM_STATS, adam_step

from conftest import GradBank, assert_same_state, make_params, set_grads


# ---- opcheck --------------------------------------------------------------------------------------

def op_args(algorithm=0, amsgrad=False, stats=True, prev=False, lr_tensor=False, amp=False, dtypes=None):
    gen = torch.Generator().manual_seed(0)
    dtypes = dtypes or [torch.float32, torch.float32, torch.float32]
    sizes = [5, 17, 33][: len(dtypes)]
    params = [torch.randn(n, generator=gen).to(dt) for n, dt in zip(sizes, dtypes)]
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    args = (
        params,
        grads,
        [torch.randn(p.shape, generator=gen).to(p.dtype) * 0.1 for p in params],
        [torch.rand(p.shape, generator=gen).to(p.dtype) * 0.1 for p in params],
        [torch.rand(p.shape, generator=gen).to(p.dtype) * 0.2 for p in params] if amsgrad else [],
        [torch.randn(p.shape, generator=gen).to(p.dtype) * 0.01 for p in params] if prev else [],
        [torch.full((), 3.0) for _ in params],
    )
    kwargs = dict(
        algorithm=algorithm, lr=1e-3, lr_tensor=torch.tensor(2e-3) if lr_tensor else None, beta1=0.9, beta2=0.999,
        weight_decay=0.01, eps=1e-8, amsgrad=amsgrad, maximize=False,
        grad_scale=torch.tensor(8.0) if amp else None, found_inf=torch.tensor(0.0) if amp else None,
        stats=torch.zeros(len(params), NUM_STATS, dtype=torch.float64) if stats else None, stat_rows=[],
    )
    return args, kwargs


OPCHECK_CASES = {
    "adam": dict(),
    "adam-nostats": dict(stats=False),
    "adam-amsgrad": dict(amsgrad=True),
    "adam-amsgrad-nostats": dict(amsgrad=True, stats=False),
    "adamw-prev-lr-tensor": dict(algorithm=1, prev=True, lr_tensor=True),
    "adamax-amp": dict(algorithm=2, amp=True),
    "adam-mixed-dtypes-amp": dict(amp=True, amsgrad=True, dtypes=[torch.float32, torch.bfloat16, torch.float64]),
}


@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck(case):
    args, kwargs = op_args(**OPCHECK_CASES[case])
    torch.library.opcheck(adam_step.default, args, kwargs)


def test_opcheck_stat_rows_subset():
    """Two parameters writing rows 0 and 2 of a 3-row statistics buffer (row 1: a param without grad)."""
    args, kwargs = op_args(dtypes=[torch.float32, torch.float32])
    kwargs["stats"] = torch.zeros(3, NUM_STATS, dtype=torch.float64)
    kwargs["stat_rows"] = [0, 2]
    torch.library.opcheck(adam_step.default, args, kwargs)
    adam_step(*args, **kwargs)
    assert torch.all(kwargs["stats"][1] == 0) and torch.all(kwargs["stats"][[0, 2], 0] > 0)


# ---- torch.compile --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inductor():
    """Skips the module's compile tests cleanly where inductor (or its C++ toolchain) is missing."""
    try:
        import torch._inductor  # noqa: F401

        probe = torch.compile(lambda x: x * 2 + 1, fullgraph=True)
        probe(torch.ones(3))
    except Exception as error:  # noqa: BLE001 - any failure here means "no working inductor"
        pytest.skip(f"torch.compile with inductor is unavailable: {error}")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_step_matches_eager(inductor):
    """`opt.step()` compiled with fullgraph=True: θ, state, statistics and epoch geometry bitwise
    equal to eager over three epochs (the epoch boundaries are eager calls between compiled steps),
    with a tensor lr, and the counters advance."""
    sizes = (5, 17, 33, 1000)
    eager_p, compiled_p = make_params(sizes), make_params(sizes)
    kwargs = dict(lr=torch.tensor(1e-2), weight_decay=0.01, amsgrad=True)
    eager, compiled = ia.Adam(eager_p, **kwargs), ia.Adam(compiled_p, **kwargs)

    @torch.compile(fullgraph=True)
    def step(opt):
        opt.step()

    bank = GradBank(sizes)
    for t in range(9):
        grads = bank.grads(t)
        set_grads(eager_p, grads)
        set_grads(compiled_p, grads)
        eager.step()
        step(compiled)
        assert torch.equal(eager.last_step_statistics().values, compiled.last_step_statistics().values), t
        torch.testing.assert_close(eager.last_step_statistics().derived(), compiled.last_step_statistics().derived(),
                                   rtol=0, atol=0, equal_nan=True)
        if t % 3 == 2:
            torch.testing.assert_close(eager.end_epoch().values, compiled.end_epoch().values, rtol=0, atol=0, equal_nan=True)
    assert_same_state(eager, compiled, eager_p, compiled_p)
    assert (compiled.steps_done, compiled.epochs_done) == (9, 3)
    for p, q in zip(eager_p, compiled_p):
        assert torch.equal(eager.state[p]["prev_epoch_step"], compiled.state[q]["prev_epoch_step"])


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def test_compiled_training_step(inductor):
    """forward + backward + step in one compiled function (backward and zero_grad are graph breaks
    of their own): ours bitwise equal to the same compiled function with torch's fused Adam, and
    close to eager (inductor's forward/backward round differently from eager's, ~1e-7 relative)."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 3, generator=gen)

    def train_step(model, opt):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    compiled_step = torch.compile(train_step)
    runs = {}
    for label, cls, kwargs, fn in [
        ("ours-compiled", ia.Adam, {}, compiled_step),
        ("torch-compiled", torch.optim.Adam, dict(fused=True), compiled_step),
        ("ours-eager", ia.Adam, {}, train_step),
    ]:
        model = make_model()
        opt = cls(model.parameters(), lr=1e-2, **kwargs)
        losses = [fn(model, opt) for _ in range(6)]
        runs[label] = (model, opt, torch.stack(losses))
    ours, theirs, eager = runs["ours-compiled"], runs["torch-compiled"], runs["ours-eager"]
    assert torch.equal(ours[2], theirs[2])
    for p, q in zip(ours[0].parameters(), theirs[0].parameters()):
        assert torch.equal(p, q)
    torch.testing.assert_close(ours[2], eager[2], rtol=1e-5, atol=1e-6)
    for p, q in zip(ours[0].parameters(), eager[0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert ours[1].steps_done == 6
    assert torch.all(ours[1].last_step_statistics()["grad_sumsq"] > 0)


# ---- GradScaler -----------------------------------------------------------------------------------

@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaler.step", "unscale_+clip"])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_grad_scaler_with_an_inf_step(name, unscale_first):
    """torch.amp.GradScaler("cpu") with ours and with torch fused, each with its own scaler: the
    same θ, state, grads and scale every step. Step 3 has an inf gradient: the step is skipped (θ,
    m, v and the step counters unchanged, all statistics zero) and the scale backs off."""
    ours_cls, torch_cls = {"Adam": (ia.Adam, torch.optim.Adam), "AdamW": (ia.AdamW, torch.optim.AdamW)}[name]
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 3, generator=gen)
    setups = []
    for cls, kwargs in ((ours_cls, {}), (torch_cls, dict(fused=True))):
        model = make_model()
        opt = cls(model.parameters(), lr=1e-2, amsgrad=True, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        setups.append((model, opt, scaler))
    for t in range(6):
        scale_before = setups[0][2].get_scale()
        snapshots = []
        for model, opt, scaler in setups:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            if t == 3:
                next(model.parameters()).grad[0, 0] = float("inf")
            snapshots.append(([p.clone() for p in model.parameters()],
                              [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
                              if t > 0 else None))
            if unscale_first:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            scaler.step(opt)
            scaler.update()
        (m_ours, o_ours, s_ours), (m_theirs, o_theirs, s_theirs) = setups
        assert s_ours.get_scale() == s_theirs.get_scale()
        for p, q in zip(m_ours.parameters(), m_theirs.parameters()):
            assert torch.equal(p, q), t
            # unscaled in place the same way (NaN after clipping an inf gradient)
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, equal_nan=True)
            for k in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                assert torch.equal(o_ours.state[p][k], o_theirs.state[q][k]), (t, k)
        stats = o_ours.last_step_statistics()
        if t == 3:
            assert torch.all(stats.values == 0)
            before_params, before_state = snapshots[0]
            for p, b, s in zip(m_ours.parameters(), before_params, before_state):
                assert torch.equal(p, b)
                for k, v in s.items():
                    assert torch.equal(o_ours.state[p][k], v), k
            assert s_ours.get_scale() == scale_before * 0.5  # backoff_factor
        else:
            assert torch.all(stats["grad_sumsq"] > 0)
            # The statistics see the unscaled gradient (what p.grad holds after the step).
            g = torch.cat([p.grad.reshape(-1) for p in m_ours.parameters()]).double()
            assert stats.sums()["grad_sumsq"].item() == pytest.approx(float((g * g).sum()), rel=1e-6)
    assert o_ours.state[next(m_ours.parameters())]["step"].item() == 5
