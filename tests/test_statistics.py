"""The per-step statistics against independent float64 sums made from outside the optimizer.

Each check snapshots θ and the state before and after `opt.step()` and recomputes every entry of
STAT_NAMES in float64 from those snapshots (never through instrumented_adam.reference). The kernel
accumulates fp32 partials that it folds into fp64 every few vectors, so its sums carry a relative
error of a few 1e-7 of Σ|terms| at most (adam_kernel_isa.cpp, kFlushEvery): asserted 1e-6, for
sums of squares relative to the sum, for dot products relative to Σ|terms| (a dot product can
cancel to ~0). The effective step size lr/(bc1·(√v/√bc2+eps)) is recomputed in float64 from the
stored v; the kernel's fp32 denominator differs by a few ulp, within the same 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch

import instrumented_adam as ia
from instrumented_adam import STAT_NAMES

from conftest import LARGE_SIZES, ODD_SIZES, OPTIMIZERS, GradBank, make_params, run_isa_subprocess, set_grads

REL = 1e-6

SUM_OF_SQUARES = ("grad_sumsq", "exp_avg_sumsq", "update_sumsq", "param_sumsq", "second_moment_sum", "eff_lr_sum")
DOTS = ("update_dot_grad", "exp_avg_dot_grad", "update_dot_prev_epoch")


def moment_key(opt, group) -> str:
    if isinstance(opt, torch.optim.Adamax):
        return "exp_inf"
    return "max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"


def expected_row(opt, group, before_p, after_p, grad, after_state, prev_step=None):
    """Every statistic of one tensor's step, from the snapshots, in float64.

    Returns {name: (value, scale)}: the tolerance of `name` is REL * scale.
    """
    g = grad.double().reshape(-1)
    m = after_state["exp_avg"].double().reshape(-1)
    moment = after_state[moment_key(opt, group)].double().reshape(-1)
    theta = after_p.double().reshape(-1)
    delta = theta - before_p.double().reshape(-1)
    t = after_state["step"].item()
    lr = float(group["lr"])
    beta1, beta2 = group["betas"]
    bc1 = 1 - beta1**t
    if isinstance(opt, torch.optim.Adamax):
        eff = lr / (bc1 * moment)
    else:
        eff = lr / (bc1 * (moment.sqrt() / math.sqrt(1 - beta2**t) + group["eps"]))

    def dot(a, b):
        terms = a * b
        return terms.sum().item(), terms.abs().sum().item()

    def total(x):
        v = x.sum().item()
        return v, abs(v)

    out = {
        "grad_sumsq": total(g * g),
        "exp_avg_sumsq": total(m * m),
        "second_moment_sum": total(moment),
        "update_sumsq": total(delta * delta),
        "param_sumsq": total(theta * theta),
        "update_dot_grad": dot(delta, g),
        "exp_avg_dot_grad": dot(m, g),
        "update_dot_prev_epoch": dot(delta, prev_step.double().reshape(-1)) if prev_step is not None else (0.0, 0.0),
        "nonfinite_grads": (float((~torch.isfinite(grad)).sum()), 0.0),
        "eff_lr_sum": total(eff),
        "eff_lr_max": (eff.max().item(), eff.max().item()) if eff.numel() else (0.0, 0.0),
    }
    assert tuple(out) == STAT_NAMES
    return out


def assert_row(actual: torch.Tensor, expected: dict, where: str):
    for j, name in enumerate(STAT_NAMES):
        value, scale = expected[name]
        got = actual[j].item()
        assert abs(got - value) <= REL * scale + 1e-300, (
            f"{where} {name}: kernel {got!r}, float64 {value!r} (rel. to scale {abs(got - value) / max(scale, 1e-300):.3g})"
        )


def step_and_check(opt, params, grads, prev_steps=None, where=""):
    """One step; asserts every statistic of every row against the snapshots. Returns the stats."""
    before = [p.detach().clone() for p in params]
    set_grads(params, grads)
    opt.step()
    stats = opt.last_step_statistics()
    row = 0
    for group in opt.param_groups:
        for p in group["params"]:
            i = next(k for k, q in enumerate(params) if q is p)
            if p.grad is None:
                assert torch.all(stats.values[row] == 0), f"{where} row {row}: a parameter without grad"
            else:
                prev = prev_steps[i] if prev_steps is not None else None
                exp = expected_row(opt, group, before[i], p.detach(), p.grad, opt.state[p], prev)
                assert_row(stats.values[row], exp, f"{where} row {row} (numel {p.numel()})")
            row += 1
    return stats


STAT_CONFIGS = {
    "adam": ("Adam", dict(lr=1e-2)),
    "adam-wd-amsgrad-maximize": ("Adam", dict(lr=1e-2, weight_decay=0.05, amsgrad=True, maximize=True)),
    "adam-beta1-low-lr-tensor": ("Adam", dict(lr=torch.tensor(3e-3), betas=(0.3, 0.95), eps=1e-6)),
    "adamw": ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    "adamax": ("Adamax", dict(lr=2e-3, weight_decay=0.01)),
}


@pytest.mark.parametrize("config", sorted(STAT_CONFIGS))
def test_every_statistic_odd_sizes(config):
    """Odd sizes (every SIMD tail), zero-size tensors, tensors of several work items."""
    name, kwargs = STAT_CONFIGS[config]
    shapes = [(n,) for n in ODD_SIZES + LARGE_SIZES] + [(0,), (0, 3), (3, 5), (2, 3, 7)]
    params = make_params(shapes)
    opt = OPTIMIZERS[name][0](params, **kwargs)
    bank = GradBank([p.shape for p in params])
    for t in range(4):
        step_and_check(opt, params, bank.grads(t), where=f"{config} step {t}")


@pytest.mark.parametrize("name", ["Adam", "Adamax"])
def test_every_statistic_fp64(name):
    """fp64 parameters: the kernel sums in fp64 throughout; the same 1e-6 holds (with room)."""
    shapes = [(n,) for n in ODD_SIZES] + [(0,), (40_000,)]
    params = make_params(shapes, torch.float64)
    opt = OPTIMIZERS[name][0](params, lr=1e-2, weight_decay=0.01)
    bank = GradBank([p.shape for p in params], torch.float64)
    for t in range(3):
        step_and_check(opt, params, bank.grads(t), where=f"fp64 {name} step {t}")


def test_many_small_tensors():
    """A group of 300 small tensors (one kernel call, one parallel region, one row each)."""
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 41, (300,), generator=gen).tolist()
    params = make_params(sizes)
    opt = ia.Adam([dict(params=params[:150]), dict(params=params[150:], lr=3e-3, amsgrad=True)], lr=1e-2)
    bank = GradBank([p.shape for p in params], bank=2)
    for t in range(3):
        stats = step_and_check(opt, params, bank.grads(t), where=f"step {t}")
    assert stats.values.shape == (300, len(STAT_NAMES))


def test_two_threads_bitwise_equal_to_one(two_threads):
    """The work split does not depend on the thread count: θ and statistics bitwise equal, and right."""
    sizes = LARGE_SIZES + (200_003, 33, 1)

    def run(threads):
        torch.set_num_threads(threads)
        params = make_params(sizes)
        opt = ia.Adam(params, lr=1e-2)
        bank = GradBank(sizes, bank=2)
        for t in range(3):
            set_grads(params, bank.grads(t))
            opt.step()
        return params, opt, bank

    p1, o1, _ = run(1)
    p2, o2, bank = run(2)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert torch.equal(o1.last_step_statistics().values, o2.last_step_statistics().values)
    step_and_check(o2, p2, bank.grads(3), where="2 threads")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax"])
def test_statistics_do_not_change_the_update(name, dtype):
    """statistics=False and True (with epoch boundaries) give bitwise identical θ and state."""
    sizes = ODD_SIZES + (1031,)
    kwargs = dict(lr=1e-2, weight_decay=0.01)
    if name == "Adam":
        kwargs["amsgrad"] = True
    runs = []
    for statistics in (False, True):
        params = make_params(sizes, dtype)
        opt = OPTIMIZERS[name][0](params, statistics=statistics, **kwargs)
        bank = GradBank(sizes, dtype)
        for t in range(40):
            set_grads(params, bank.grads(t))
            opt.step()
            if t % 10 == 9:
                opt.end_epoch()
        runs.append((params, opt))
    (p_off, o_off), (p_on, o_on) = runs
    for a, b in zip(p_off, p_on):
        assert torch.equal(a, b)
        for k, v in o_off.state[a].items():
            assert torch.equal(v, o_on.state[b][k]), k


# ---- non-finite gradients -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_nonfinite_gradients_counted_update_as_torch(name, dtype):
    """NaN/±inf gradients: counted, and θ and state are exactly torch fused's (NaN where it has NaN)."""
    check_nonfinite_against_torch(name, dtype, amsgrad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_nonfinite_gradients_without_amsgrad(name, dtype):
    check_nonfinite_against_torch(name, dtype, amsgrad=False)


def check_nonfinite_against_torch(name, dtype, amsgrad):
    ours_cls, torch_cls = OPTIMIZERS[name]
    # Every dtype matches torch bitwise, NaN pattern included (fp64 too, test_parity.py).
    rtol = 0.0
    sizes = (1, 9, 17, 25, 31, 33, 47, 63, 1000)
    params = make_params(sizes, dtype)
    ours_p = [p.clone() for p in params]
    theirs_p = [p.clone() for p in params]
    kwargs = dict(lr=1e-2, amsgrad=amsgrad, weight_decay=0.01)
    ours = ours_cls(ours_p, **kwargs)
    theirs = torch_cls(theirs_p, fused=True, **kwargs)
    bank = GradBank(sizes, dtype)
    for t in range(4):
        grads = [g.clone() for g in bank.grads(t)]
        expected = [0.0] * len(sizes)
        if t == 1:  # every 5th element NaN, the next one ±inf, in every tensor except the first
            for i, g in enumerate(grads[1:], start=1):
                g[0::5] = float("nan")
                g[1::5] = float("inf") if i % 2 else float("-inf")
                expected[i] = float(len(range(0, g.numel(), 5)) + len(range(1, g.numel(), 5)))
        set_grads(ours_p, grads)
        set_grads(theirs_p, grads)
        ours.step()
        theirs.step()
        assert ours.last_step_statistics()["nonfinite_grads"].tolist() == expected, f"step {t}"
        for i, (p, q) in enumerate(zip(ours_p, theirs_p)):
            torch.testing.assert_close(p, q, rtol=rtol, atol=0, equal_nan=True, msg=lambda m: f"param {i} step {t}: {m}")
            for k, v in theirs.state[q].items():
                torch.testing.assert_close(ours.state[p][k], v, rtol=rtol, atol=0, equal_nan=True,
                                           msg=lambda m: f"param {i} ({sizes[i]}) {k} step {t}: {m}")
    # The poisoned tensors are NaN from then on (as torch's); the clean one was not touched.
    assert torch.isnan(ours_p[1]).any() and not torch.isnan(ours_p[0]).any()


# ---- derived figures ----------------------------------------------------------------------------

def test_derived_hand_checked():
    """One Adam step with eps = 0 from zero moments: Δθ = −lr·sign(g), m = (1−β1)·g, v = (1−β2)·g².

    Group 0: θ = [1, 1], g = [3, 4] (‖g‖ = 5), lr = 0.1.   Group 1: θ = [2, −2, 5], g = [5, −12, 0],
    lr = 0.01, eps = 0, but the third element has no gradient signal: with g = 0 and eps = 0 its
    update would be 0/0, so group 1 holds it in a separate parameter without a grad (a zero row,
    excluded from the per-element means).
    """
    b1, b2 = 0.9, 0.999
    a = torch.tensor([1.0, 1.0])
    b = torch.tensor([2.0, -2.0])
    frozen = torch.tensor([5.0])
    opt = ia.Adam([dict(params=[a], lr=0.1), dict(params=[b, frozen], lr=0.01)], betas=(b1, b2), eps=0.0)
    a.grad = torch.tensor([3.0, 4.0])
    b.grad = torch.tensor([5.0, -12.0])
    opt.step()
    stats = opt.last_step_statistics()
    assert stats.step == 1

    def close(x, y):
        assert torch.allclose(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64),
                              rtol=1e-6, atol=1e-12), (x, y)

    close(a, [0.9, 0.9])
    close(b, [1.99, -1.99])
    t = stats.derived("tensor")
    close(t["grad_norm"], [5.0, 13.0, 0.0])
    close(t["exp_avg_norm"], [0.5, 1.3, 0.0])
    close(t["update_norm"], [0.1 * math.sqrt(2), 0.01 * math.sqrt(2), 0.0])
    close(t["param_norm"], [0.9 * math.sqrt(2), 1.99 * math.sqrt(2), 0.0])
    close(t["update_to_param"][:2], [1 / 9, 1 / 199])
    assert math.isnan(t["update_to_param"][2])  # 0/0 is undefined, not 0
    close(t["cos_update_grad"][:2], [-7 / (5 * math.sqrt(2)), -17 / (13 * math.sqrt(2))])
    close(t["cos_exp_avg_grad"][:2], [1.0, 1.0])
    # v = (1 − β2)·g²; the mean over the tensor's elements.
    close(t["second_moment_mean"][:2], [(1 - b2) * 25 / 2, (1 - b2) * 169 / 2])
    # eff_lr = lr / (bc1 · |g|) with bc1 = 1 − β1 = 0.1.
    close(t["eff_lr_mean"][:2], [(1 / 3 + 1 / 4) / 2, (0.1 / 5 + 0.1 / 12) / 2])
    close(t["eff_lr_max"], [1 / 3, 0.1 / 5, 0.0])
    close(t["update_dot_grad"], [-0.7, -0.17, 0.0])
    assert torch.isnan(t["cos_update_prev_epoch"]).all()  # no epoch has ended

    g = stats.derived("group")
    close(g["grad_norm"], [5.0, 13.0])
    close(g["update_to_param"], [1 / 9, 1 / 199])
    # The frozen parameter does not dilute group 1's means: 2 elements took the step, not 3.
    close(g["eff_lr_mean"], [(1 / 3 + 1 / 4) / 2, (0.1 / 5 + 0.1 / 12) / 2])
    close(g["second_moment_mean"], [(1 - b2) * 25 / 2, (1 - b2) * 169 / 2])

    o = stats.derived("overall")
    close(o["grad_norm"], [math.sqrt(25 + 169)])  # root of the summed squares
    close(o["update_norm"], [math.sqrt(0.02 + 0.0002)])
    close(o["param_norm"], [math.sqrt(2 * 0.81 + 2 * 1.99**2)])
    close(o["update_to_param"], [math.sqrt(0.02 + 0.0002) / math.sqrt(2 * 0.81 + 2 * 1.99**2)])
    close(o["cos_update_grad"], [(-0.7 - 0.17) / (math.sqrt(0.0202) * math.sqrt(194))])
    close(o["cos_exp_avg_grad"], [1.0])
    close(o["eff_lr_mean"], [(1 / 3 + 1 / 4 + 0.1 / 5 + 0.1 / 12) / 4])
    close(o["eff_lr_max"], [1 / 3])
    close(o["nonfinite_grads"], [0.0])
    sums = stats.sums("overall")
    close(sums["numel"], [4.0])
    close(sums["update_dot_grad"], [-0.87])


def test_update_dot_prev_epoch_after_boundary():
    """After an epoch boundary each step is dotted with the previous epoch's step s_{k-1}."""
    sizes = (7, 33, 1000)
    params = make_params(sizes)
    opt = ia.Adam(params, lr=1e-2, epoch_buffers="exact")  # s_{k-1} as computed (compact: test_epoch_buffers.py)
    bank = GradBank(sizes)
    start = [p.clone() for p in params]  # θ when instrumentation began (the first step)
    for t in range(5):
        stats = step_and_check(opt, params, bank.grads(t), where=f"epoch 0 step {t}")
        assert torch.all(stats["update_dot_prev_epoch"] == 0)
        assert torch.isnan(stats.derived()["cos_update_prev_epoch"]).all()
    opt.end_epoch()
    s0 = [p.double() - q.double() for p, q in zip(params, start)]  # computed here, not read back
    for t in range(5, 8):
        before = [p.clone() for p in params]
        stats = step_and_check(opt, params, bank.grads(t), prev_steps=s0, where=f"epoch 1 step {t}")
        delta = [p.double() - q.double() for p, q in zip(params, before)]
        dot = sum(float((d * s).sum()) for d, s in zip(delta, s0))
        cos = dot / (math.sqrt(sum(float((d * d).sum()) for d in delta)) * math.sqrt(sum(float((s * s).sum()) for s in s0)))
        assert stats.derived()["cos_update_prev_epoch"].item() == pytest.approx(cos, rel=1e-6)
        per_tensor = stats.derived("tensor")["cos_update_prev_epoch"]
        for i, (d, s) in enumerate(zip(delta, s0)):
            assert per_tensor[i].item() == pytest.approx(float((d * s).sum() / (d.norm() * s.norm())), rel=1e-6)
    theta_end0 = [q.double() + s for q, s in zip(start, s0)]
    opt.end_epoch()
    s1 = [p.double() - q for p, q in zip(params, theta_end0)]  # s_1 = θ_end(1) − θ_end(0)
    step_and_check(opt, params, bank.grads(8), prev_steps=s1, where="epoch 2")


# ---- reduced precision ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_statistics_describe_stored_state(dtype):
    sizes = (7, 33, 1000)
    params = make_params(sizes, dtype)
    opt = ia.Adam(params, lr=1e-2, amsgrad=True)
    bank = GradBank(sizes, dtype)
    for t in range(3):
        step_and_check(opt, params, bank.grads(t), where=f"{dtype} step {t}")


def test_reduced_precision_statistics_within_storage_rounding():
    """A looser, independent bound on bf16 statistics: the stored-state sums to within bf16 rounding
    (test_reduced_precision_statistics_describe_stored_state checks them exactly).

    Per element the fp32 value and the stored bf16 value differ by at most 2^-8 relative, so a sum
    of squares by at most 2^-7 and a sum or dot product by 2^-8 of Σ|terms|; eff_lr through √v by
    about 2^-9 (asserted 2^-8). θ (and so Δθ, Σθ², Δθ·g) is round-tripped and meets the fp32
    tolerance. Measured on the first step: exp_avg_sumsq off by 1.9e-3 (bf16) / 4.7e-4 (fp16).
    """
    sizes = (7, 33, 1000)
    params = make_params(sizes, torch.bfloat16)
    opt = ia.Adam(params, lr=1e-2, amsgrad=True)
    bank = GradBank(sizes, torch.bfloat16)
    loose = {"exp_avg_sumsq": 2.0**-7, "second_moment_sum": 2.0**-8, "exp_avg_dot_grad": 2.0**-8,
             "eff_lr_sum": 2.0**-8, "eff_lr_max": 2.0**-8}
    for t in range(3):
        before = [p.clone() for p in params]
        set_grads(params, bank.grads(t))
        opt.step()
        stats = opt.last_step_statistics()
        group = opt.param_groups[0]
        for i, p in enumerate(params):
            exp = expected_row(opt, group, before[i], p, p.grad, opt.state[p])
            for j, name in enumerate(STAT_NAMES):
                value, scale = exp[name]
                assert abs(stats.values[i, j].item() - value) <= loose.get(name, REL) * scale + 1e-300, name


# ---- the AVX2 kernels -----------------------------------------------------------------------------

@pytest.mark.isa_subprocess
def test_isa_subprocess_avx2():
    """This whole file again with the kernels forced to AVX2 (the default here is AVX-512)."""
    run_isa_subprocess("test_statistics.py", "avx2", "AVX2")


def test_last_step_statistics_snapshot_or_live_view():
    """copy=True is a snapshot the next step leaves alone; copy=False is the live buffer."""
    p = torch.nn.Parameter(torch.randn(17))
    opt = ia.Adam([p], lr=1e-2)
    p.grad = torch.randn(17)
    opt.step()
    snapshot, live = opt.last_step_statistics(), opt.last_step_statistics(copy=False)
    first = snapshot.values.clone()
    assert torch.equal(live.values, first)
    p.grad = 10 * torch.randn(17)
    opt.step()
    assert torch.equal(snapshot.values, first)
    assert torch.equal(live.values, opt.last_step_statistics().values)
    assert not torch.equal(live.values, first)
