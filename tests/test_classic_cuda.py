"""SGD, RMSprop and Adagrad on CUDA (csrc/cuda/classic_rules.cuh): parity with torch's CUDA
optimizers, the statistics, and the promises of docs/cuda.md (no host synchronisation, GradScaler,
lr tensors on the device). Skipped without a GPU.

Run on a GPU machine after `python setup.py build_ext --inplace`:
    python -m pytest tests/test_classic_cuda.py

What is asserted, and why (docs/cuda.md, "SGD, RMSprop and Adagrad"):

* SGD and Adagrad, fp32, bf16, fp16 and fp64: bitwise equal (torch.equal) to
  torch.optim.SGD/Adagrad(fused=True) on the same GPU after 300 steps, parameters and every state
  tensor, for every option, lr as a float and as a device tensor, statistics on and off. Our rules
  spell out torch's CUDA arithmetic (Adagrad: double where its double hyperparameters meet fp32
  values; SGD: the same or all in the compute type, by the torch form setup.py detects; the
  contractions nvcc 13.0 makes of torch's expressions) with correctly rounded intrinsics; only a
  torch whose kernels differ, or another nvcc contraction in torch's own build, breaks this.
* RMSprop: torch has no fused kernel. Ours computes torch's single-tensor sequence of ATen ops
  as its CUDA kernels round each (addcmul / addcdiv as fma(value, t1 op t2, input)), in the
  compute type. Against torch's single-tensor and foreach CUDA paths in fp32 after 300 steps:
  asserted to rtol = atol = 1e-5 (1e-12 in fp64), expected bitwise where torch's kernels are
  those of torch 2.13 (docs/cuda.md); the gradients do not depend on the parameters, so an
  ulp-level difference per step would not grow beyond that. Against our CPU kernel (torch's CPU
  roundings: fma((1 - α)·g, g, v), fma(−ḡ, ḡ, v), and MKL's sqrt in fp32): to 1e-5 in fp32,
  1e-2 in bf16/fp16 (a stored value an ulp apart now and then).
* Statistics on / off: bitwise identical parameters and state, every family and storage type, and
  independent of how the work is split into launches.
* Statistics: against float64 sums recomputed from the optimizer's own snapshots
  (test_classic_statistics.expected_row), to 1e-6 of each sum's scale, for odd sizes, chunk
  boundaries, an empty tensor and epoch boundaries (the previous-epoch dot); and CPU vs CUDA
  statistics rows of the same run (fp64: 1e-9; fp32: 1e-4, the two kernels' updates differ by
  an ulp, which moves Δθ by ~1e-5 of itself).
* GradScaler: an injected inf skips the step exactly as torch's fused SGD / Adagrad do (state and
  step counters bitwise equal to torch's), and that step's statistics are zero; a skipped first
  SGD step leaves the new momentum buffers to the next step (with dampening 0 without reading
  found_inf on the host, with dampening != 0 by one read).
* No host synchronisation: steps under torch.cuda.set_sync_debug_mode("error"), lr float or
  device tensor, with and without GradScaler (after a first step, which builds the layout).
* CUDA graphs: a captured step replayed N times gives bitwise the parameters, state and
  statistics of N eager steps.
"""

from __future__ import annotations

import math

import pytest
import torch

import instrumented_adam as ia
from instrumented_adam import NUM_STATS, STAT_INDEX, STAT_NAMES

from conftest import make_params as conftest_make_params
from conftest import (GradBank, assert_graph_replay_matches_eager, grad_scaler_train_step, random_grads_step,
                      run_without_host_sync, small_model_params)
from test_classic_parity import CONFIGS, STATE_KEYS
from test_classic_statistics import KWARGS as STATS_KWARGS
from test_classic_statistics import expected_row

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
STEPS = 300
CHUNK = 32768  # csrc/cuda/adam_cuda.h, kChunk: sizes below straddle it
#: vector tails of every storage type (4 fp32, 8 bf16/fp16, 2 fp64 per 16-byte load), a chunk
#: boundary, several chunks
SIZES = (1, 3, 7, 8, 9, 17, 31, 1000, 4099, (33, 65), CHUNK - 1, CHUNK + 5, 100003)
SMALL_SIZES = (1, 3, 7, 8, 9, 17, 31, 1000, (33, 65), CHUNK + 5)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CLASSES = {"SGD": (ia.SGD, torch.optim.SGD), "RMSprop": (ia.RMSprop, torch.optim.RMSprop),
           "Adagrad": (ia.Adagrad, torch.optim.Adagrad)}
OPS = ("sgd_step", "rmsprop_step", "adagrad_step")


def test_cuda_kernels_are_registered():
    """A CUDA machine must have the classic CUDA kernels: a build without them fails here."""
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"instrumented_adam::{name}", "CUDA"), (
            f"instrumented_adam::{name} has no CUDA kernel: rebuild with `python setup.py build_ext --inplace` "
            "on this machine (docs/cuda.md)")


# ---- helpers ---------------------------------------------------------------------------------------


def make_params(sizes, dtype=torch.float32, seed=0, device=DEVICE):
    return conftest_make_params(sizes, dtype, seed=seed, device=device)


class DeviceGrads:
    """conftest.GradBank's deterministic gradients, on the device (drawn once, scaled per step)."""

    def __init__(self, params, dtype):
        bank = GradBank([p.shape for p in params], dtype)
        self.bank = [[b.to(DEVICE) for b in row] for row in bank.bank]
        self.factors = bank.factors

    def grads(self, t):
        f = self.factors[t % len(self.factors)]
        return [b[(5 * t) % len(b)] * f for b in self.bank]


def device_kwargs(kwargs, device=DEVICE):
    """"tensor:<lr>" becomes a fresh float32 tensor on `device` per optimizer."""
    out = dict(kwargs)
    if isinstance(out.get("lr"), str):
        out["lr"] = torch.tensor(float(out["lr"].split(":")[1]), dtype=torch.float32, device=device)
    return out


def float_lr(kwargs):
    """The same settings with a tensor lr as the float it holds (float32-rounded)."""
    out = dict(kwargs)
    if isinstance(out.get("lr"), str):
        out["lr"] = float(torch.tensor(float(out["lr"].split(":")[1]), dtype=torch.float32))
    return out


def torch_fused_or_skip(cls, params, kwargs):
    try:
        return cls(params, **kwargs, fused=True)
    except (RuntimeError, ValueError) as err:  # an older torch without this fused CUDA kernel
        pytest.skip(f"torch.optim.{cls.__name__}(fused=True) on CUDA: {err}")


def first_torch_step(opt):
    """torch's first step; a torch without the fused CUDA kernel fails here (its check is lazy)."""
    try:
        opt.step()
    except (NotImplementedError, RuntimeError) as err:
        if not any(getattr(g, "fused", False) for g in opt.param_groups):
            raise
        pytest.skip(f"torch.optim.{type(opt).__name__}(fused=True) on CUDA: {err}")


def run_pair(name, sizes, kwargs, torch_kwargs, *, dtype=torch.float32, steps=STEPS, statistics=True,
             epoch_every=0, torch_lr_as_float=False):
    ours_cls, torch_cls = CLASSES[name]
    params = make_params(sizes, dtype)
    ours_p = [p.clone().requires_grad_() for p in params]
    theirs_p = [p.clone().requires_grad_() for p in params]
    ours = ours_cls(ours_p, **device_kwargs(kwargs), statistics=statistics, epoch_geometry=epoch_every > 0)
    theirs_settings = float_lr(kwargs) if torch_lr_as_float else device_kwargs(kwargs)
    if torch_kwargs.get("fused"):
        theirs = torch_fused_or_skip(torch_cls, theirs_p, theirs_settings)
    else:
        theirs = torch_cls(theirs_p, **theirs_settings, **torch_kwargs)
    bank = DeviceGrads(params, dtype)
    for t in range(steps):
        grads = bank.grads(t)
        for p, q, g in zip(ours_p, theirs_p, grads):
            p.grad = g.clone()
            q.grad = g.clone()
        ours.step()
        if t == 0:
            first_torch_step(theirs)
        else:
            theirs.step()
        if epoch_every and t % epoch_every == epoch_every - 1:
            ours.end_epoch()
    return ours, theirs, ours_p, theirs_p


def state_pairs(name, ours, theirs, ours_p, theirs_p):
    """(label, ours, theirs) for every parameter and every torch state tensor."""
    for i, (p, q) in enumerate(zip(ours_p, theirs_p)):
        yield f"param {i} (numel {p.numel()})", p.detach(), q.detach()
        sp, sq = ours.state.get(p, {}), theirs.state.get(q, {})
        for k in STATE_KEYS[name]:
            if sq.get(k) is None:
                assert sp.get(k) is None, f"param {i}: {k} only in ours"
                continue
            yield f"param {i} (numel {p.numel()}) state {k}", sp[k], sq[k].to(sp[k].device)


def assert_same_state(name, ours, theirs, ours_p, theirs_p, msg=""):
    for label, a, b in state_pairs(name, ours, theirs, ours_p, theirs_p):
        assert torch.equal(a, b), f"{msg} {label}: max |diff| {(a.double() - b.double()).abs().max()}"


def assert_close_state(name, ours, theirs, ours_p, theirs_p, rtol, atol, msg=""):
    for label, a, b in state_pairs(name, ours, theirs, ours_p, theirs_p):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{msg} {label}: {m}")


# ---- parity with torch.optim.SGD / Adagrad(fused=True) on CUDA --------------------------------------

FUSED_CONFIGS = sorted(c for c, (name, _) in CONFIGS.items() if name in ("SGD", "Adagrad"))
RMSPROP_CONFIGS = sorted(c for c, (name, _) in CONFIGS.items() if name == "RMSprop")


@pytest.mark.parametrize("statistics", [True, False], ids=["stats", "nostats"])
@pytest.mark.parametrize("config", FUSED_CONFIGS)
def test_fp32_bitwise_vs_torch_fused(config, statistics):
    name, kwargs = CONFIGS[config]
    run = run_pair(name, SIZES, kwargs, dict(fused=True), statistics=statistics)
    assert_same_state(name, *run, msg=config)


@pytest.mark.parametrize("config", ["sgd-everything", "sgd-dampening-wd", "adagrad-lr-decay-wd"])
def test_fp32_bitwise_vs_torch_fused_with_epochs(config):
    """Epoch boundaries make the kernel read the previous epoch's step too (stats=on+prev)."""
    name, kwargs = CONFIGS[config]
    run = run_pair(name, SIZES, kwargs, dict(fused=True), steps=60, epoch_every=20)
    assert_same_state(name, *run, msg=config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("config", ["sgd", "sgd-everything", "sgd-dampening-wd", "adagrad-lr-decay-wd",
                                    "adagrad-initial-maximize"])
def test_other_dtypes_bitwise_vs_torch_fused(config, dtype):
    """bf16/fp16 compute in fp32 and round on store (the momentum buffer from double through fp32,
    as torch's assignment of a double to c10::BFloat16 does); fp64 computes in double."""
    name, kwargs = CONFIGS[config]
    run = run_pair(name, SMALL_SIZES, kwargs, dict(fused=True), dtype=dtype, steps=100)
    assert_same_state(name, *run, msg=f"{config} {dtype}")


# ---- RMSprop: torch's single-tensor and foreach CUDA paths, and our CPU kernel ----------------------


@pytest.mark.parametrize("path", ["single-tensor", "foreach"])
@pytest.mark.parametrize("config", RMSPROP_CONFIGS)
def test_rmsprop_fp32_vs_torch(config, path):
    name, kwargs = CONFIGS[config]
    torch_kwargs = dict(foreach=path == "foreach")
    run = run_pair(name, SIZES, kwargs, torch_kwargs, torch_lr_as_float=True)
    assert_close_state(name, *run, rtol=1e-5, atol=1e-5, msg=f"{config} vs torch {path}")


@pytest.mark.parametrize("config", ["rmsprop-everything", "rmsprop-alpha-low-centered"])
def test_rmsprop_fp64_vs_torch(config):
    name, kwargs = CONFIGS[config]
    run = run_pair(name, SMALL_SIZES, kwargs, dict(foreach=False), dtype=torch.float64, steps=100,
                   torch_lr_as_float=True)
    assert_close_state(name, *run, rtol=1e-12, atol=1e-12, msg=config)


def run_cpu_and_cuda(name, kwargs, sizes, dtype, steps, epoch_every=0):
    """Our optimizer on the CPU and on CUDA from the same parameters and gradients; the
    statistics rows of every step of both."""
    ours_cls = CLASSES[name][0]
    init = make_params(sizes, dtype, device="cpu")
    runs = {}
    for device in ("cpu", DEVICE):
        params = [p.clone().to(device).requires_grad_() for p in init]
        opt = ours_cls(params, **device_kwargs(kwargs, device), epoch_geometry=epoch_every > 0)
        runs[device] = (params, opt, [])
    bank = GradBank([p.shape for p in init], dtype)
    for t in range(steps):
        grads = bank.grads(t)
        for device, (params, opt, rows) in runs.items():
            for p, g in zip(params, grads):
                p.grad = g.clone().to(device)
            opt.step()
            rows.append(opt.last_step_statistics().values.double().cpu().clone())
            if epoch_every and t % epoch_every == epoch_every - 1:
                opt.end_epoch()
    return runs["cpu"], runs[DEVICE]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("config", ["rmsprop-everything", "rmsprop-momentum-wd", "rmsprop"])
def test_rmsprop_cuda_vs_cpu_kernel(config, dtype, tol):
    """Our CUDA and CPU kernels follow torch's CUDA and CPU roundings of the same ATen ops, which
    differ by an ulp (addcmul / addcdiv forms; MKL's sqrt on the CPU in fp32)."""
    name, kwargs = CONFIGS[config]
    (cpu_p, cpu_opt, _), (cuda_p, cuda_opt, _) = run_cpu_and_cuda(name, kwargs, SMALL_SIZES, dtype, steps=50)
    for i, (p, q) in enumerate(zip(cpu_p, cuda_p)):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=tol, atol=tol, msg=lambda m: f"param {i}: {m}")
        for k in STATE_KEYS[name]:
            a, b = cpu_opt.state[p].get(k), cuda_opt.state[q].get(k)
            assert (a is None) == (b is None), k
            if a is not None:
                torch.testing.assert_close(b.cpu(), a, rtol=tol, atol=tol, msg=lambda m: f"param {i} {k}: {m}")


# ---- statistics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adagrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_statistics_do_not_change_the_update(name, dtype):
    kwargs = STATS_KWARGS[name]
    runs = []
    for statistics in (True, False):
        params = [p.requires_grad_() for p in make_params(SMALL_SIZES, dtype)]
        opt = CLASSES[name][0](params, **kwargs, statistics=statistics)
        runs.append((params, opt))
    bank = DeviceGrads(runs[0][0], dtype)
    for t in range(5):
        for params, opt in runs:
            for p, g in zip(params, bank.grads(t)):
                p.grad = g.clone()
            opt.step()
    (pa, oa), (pb, ob) = runs
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
        for k, v in oa.state[p].items():
            if torch.is_tensor(v):
                assert torch.equal(v, ob.state[q][k]), k


def check_statistics_vs_fp64(key, sizes, steps=6, epoch_every=2, rel=1e-6):
    """test_classic_statistics.check_steps on CUDA: every step's rows against float64 sums of the
    optimizer's own snapshots (θ before and after, the gradient, the state after)."""
    name = key.split("-")[0]
    params = [p.requires_grad_() for p in make_params(sizes)]
    opt = CLASSES[name][0](params, **STATS_KWARGS[key])
    bank = DeviceGrads(params, torch.float32)
    for t in range(steps):
        grads = bank.grads(t)
        for p, g in zip(params, grads):
            p.grad = g
        before = [p.detach().clone() for p in params]
        prev = [opt.state[p].get("prev_epoch_step") for p in params]
        prev = [q.clone() if q is not None else None for q in prev]
        opt.step()
        values = opt.last_step_statistics().values
        group = opt.param_groups[0]
        for i, p in enumerate(params):
            row = expected_row(name, group, before[i], p.detach(), grads[i], opt.state[p], prev[i])
            for j, stat in enumerate(STAT_NAMES):
                want, scale = row[stat]
                got = values[i, j].item()
                assert abs(got - want) <= rel * max(scale, abs(want)) + 1e-300, (
                    f"{key} step {t} tensor {i} (numel {p.numel()}) {stat}: {got} vs {want}")
        if epoch_every and t % epoch_every == epoch_every - 1:
            opt.end_epoch()


@pytest.mark.parametrize("key", sorted(STATS_KWARGS))
def test_statistics_vs_fp64(key):
    check_statistics_vs_fp64(key, SIZES + (0,))


@pytest.mark.parametrize("key", ["SGD", "RMSprop", "Adagrad"])
def test_statistics_vs_fp64_many_small_tensors(key):
    """300 tensors: more than one launch takes (kMaxTensorsPerLaunch = 128)."""
    check_statistics_vs_fp64(key, tuple((i % 37) + 1 for i in range(300)), steps=3, epoch_every=0)


def assert_rows_close(a, b, rel):
    """Statistics rows of two kernels: each to `rel` of its magnitude, a dot product to `rel` of the
    product of the norms (the Cauchy-Schwarz bound of its sum of |terms|)."""
    dots = {"update_dot_grad": ("update_sumsq", "grad_sumsq"), "exp_avg_dot_grad": ("exp_avg_sumsq", "grad_sumsq"),
            "update_dot_prev_epoch": ("update_sumsq", "update_sumsq")}
    assert a.shape == b.shape
    for r in range(a.shape[0]):
        for name in STAT_NAMES:
            j = STAT_INDEX[name]
            if name in dots:
                x, y = dots[name]
                scale = math.sqrt(abs(a[r, STAT_INDEX[x]].item()) * abs(a[r, STAT_INDEX[y]].item()))
            else:
                scale = max(abs(a[r, j].item()), abs(b[r, j].item()))
            assert abs(a[r, j].item() - b[r, j].item()) <= rel * scale + 1e-300, (
                f"row {r} {name}: {a[r, j].item()!r} vs {b[r, j].item()!r}")


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("key", sorted(STATS_KWARGS))
def test_statistics_cpu_vs_cuda(key, dtype, rel):
    """The same run on both devices: the statistics rows of every step agree (the table's rows
    mean the same on every device)."""
    name = key.split("-")[0]
    (_, _, cpu_rows), (_, _, cuda_rows) = run_cpu_and_cuda(name, STATS_KWARGS[key], SMALL_SIZES, dtype, steps=6,
                                                           epoch_every=2)
    for t, (a, b) in enumerate(zip(cpu_rows, cuda_rows)):
        assert a.shape == (len(SMALL_SIZES), NUM_STATS)
        assert_rows_close(a, b, rel)


def test_split_launches(monkeypatch):
    """Tiny launch capacities split tensors over several launches; the statistics and updates are
    bitwise those of the unsplit run (the same per-chunk partials, combined in the same order)."""
    runs = []
    for split in (False, True):
        if split:
            monkeypatch.setenv("IA_CUDA_MAX_BLOCKS_PER_LAUNCH", "3")
            monkeypatch.setenv("IA_CUDA_MAX_TENSORS_PER_LAUNCH", "2")
        params = [p.requires_grad_() for p in make_params((7 * CHUNK + 3, 1, 5000, 2 * CHUNK), seed=4)]
        opt = ia.RMSprop(params, lr=1e-3, momentum=0.9, centered=True)
        bank = DeviceGrads(params, torch.float32)
        rows = []
        for t in range(3):
            for p, g in zip(params, bank.grads(t)):
                p.grad = g.clone()
            opt.step()
            rows.append(opt.last_step_statistics().values.clone())
        runs.append((params, opt, rows))
    (pa, oa, ra), (pb, ob, rb) = runs
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
        for k in ("square_avg", "momentum_buffer", "grad_avg", "step"):
            assert torch.equal(oa.state[p][k], ob.state[q][k]), k
    for a, b in zip(ra, rb):
        assert torch.equal(a, b), "splitting launches must not change the statistics"


# ---- the ops directly: first_step, found_inf, grad_scale, stat_rows, lr tensor -----------------------


def test_sgd_op_first_step_and_stat_rows():
    """first_step[i] = 1 makes buffer i the (weight-decayed) gradient; 0 uses the buffer as it is.
    Rows of parameters not in the call are zeroed; each parameter writes its stat_rows row."""
    params = make_params((100, 3000, 7), seed=1)
    bufs = [torch.full_like(p, 0.5) for p in params]
    grads = make_params((100, 3000, 7), seed=2)
    stats = torch.full((5, NUM_STATS), 7.0, dtype=torch.float64, device=DEVICE)
    old = [p.clone() for p in params]
    torch.ops.instrumented_adam.sgd_step(params, grads, bufs, [], lr=0.1, lr_tensor=None, momentum=0.9,
                                         dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                                         first_step=[1, 0, 1], grad_scale=None, found_inf=None, stats=stats,
                                         stat_rows=[4, 0, 2])
    assert torch.equal(bufs[0], grads[0]) and torch.equal(bufs[2], grads[2])
    # fma(1 - 0, g, 0.9 * 0.5): in double and rounded once (torch's form 1), or in fp32 (form 2,
    # docs/cuda.md); 0.9 * 0.5 is exact in either type.
    form1 = (grads[1].double() + 0.9 * 0.5).float()
    form2 = grads[1] + torch.tensor(0.9, dtype=torch.float32) * 0.5
    assert torch.equal(bufs[1], form1) or torch.equal(bufs[1], form2)
    for row in (1, 3):
        assert torch.equal(stats[row], torch.zeros_like(stats[row]))
    for i, row in enumerate((4, 0, 2)):
        d = (params[i].double() - old[i].double()).reshape(-1)
        assert abs(stats[row, STAT_INDEX["update_sumsq"]].item() - (d * d).sum().item()) <= 1e-6 * (d * d).sum().item()
        assert stats[row, STAT_INDEX["eff_lr_max"]].item() == pytest.approx(0.1, rel=1e-7)


@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adagrad"])
def test_found_inf_and_grad_scale(name):
    """found_inf skips the step whole (parameters, state, gradients, step counters; statistics
    zero); grad_scale unscales the gradients in place. Both read on the device."""
    a = [p.requires_grad_() for p in make_params((37, CHUNK + 3), seed=3)]
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_a = CLASSES[name][0](a, **STATS_KWARGS[name])
    opt_b = CLASSES[name][0](b, **STATS_KWARGS[name])
    grads = make_params((37, CHUNK + 3), seed=4)
    for p, q, g in zip(a, b, grads):
        p.grad = g * 1024
        q.grad = g.clone()
    opt_a.grad_scale = torch.tensor(1024.0, device=DEVICE)
    opt_a.found_inf = torch.tensor(0.0, device=DEVICE)
    opt_a.step()
    opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)  # (g * 1024) / 1024 is exact
    before = [p.detach().clone() for p in a]
    state_before = [{k: v.clone() for k, v in opt_a.state[p].items() if torch.is_tensor(v)} for p in a]
    opt_a.found_inf = torch.tensor(1.0, device=DEVICE)
    for p, g in zip(a, grads):
        p.grad = g * 1024
    opt_a.step()
    for p, old, st, g in zip(a, before, state_before, grads):
        assert torch.equal(p.detach(), old)
        assert torch.equal(p.grad, g * 1024)  # not unscaled either
        for k, v in st.items():
            assert torch.equal(opt_a.state[p][k], v), k
    assert opt_a.last_step_statistics().values.abs().sum() == 0


class _ScalerStep:
    """scaler.step(opt) as an optimizer-like step() for first_torch_step."""

    def __init__(self, scaler, opt):
        self.scaler, self.opt, self.param_groups = scaler, opt, opt.param_groups

    def step(self):
        self.scaler.step(self.opt)


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_grad_scaler_inf_step_matches_torch_fused(name):
    kwargs = {"SGD": dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01),
              "Adagrad": dict(lr=1e-2, lr_decay=1e-2, weight_decay=0.01)}[name]
    ours_cls, torch_cls = CLASSES[name]
    shapes = ((64, 33), (33,), (1000,))
    init = make_params(shapes, seed=2)
    weights = make_params(shapes, seed=3)
    runs = []
    for cls, fused in ((ours_cls, False), (torch_cls, True)):
        params = [p.clone().requires_grad_() for p in init]
        opt = torch_fused_or_skip(cls, params, kwargs) if fused else cls(params, **kwargs)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10, growth_interval=2)
        runs.append((params, opt, scaler))
    inf_step = 3  # not the first: torch's fused SGD keeps an uninitialised buffer after a skipped first step
    for t in range(7):
        for params, opt, scaler in runs:
            opt.zero_grad(set_to_none=True)
            loss = sum((p * w).sum() + 0.5 * (p * p * p).sum() for p, w in zip(params, weights))
            scaler.scale(loss).backward()
            if t == inf_step:
                params[1].grad[3] = float("inf")
            if t == 0:
                first_torch_step(_ScalerStep(scaler, opt))
            else:
                scaler.step(opt)
            scaler.update()
        (op_, ours, s_ours), (tp, theirs, s_theirs) = runs
        assert_same_state(name, ours, theirs, op_, tp, f"step {t}")
        assert s_ours.get_scale() == s_theirs.get_scale()
        stats = ours.last_step_statistics().values
        if t == inf_step:
            assert torch.equal(stats, torch.zeros_like(stats)), "a skipped step has zero statistics"
        else:
            assert (stats[:, STAT_INDEX["grad_sumsq"]] > 0).all()
    if name == "Adagrad":
        assert ours.state[op_[0]]["step"].item() == 6.0  # seven steps, one skipped


@pytest.mark.parametrize("dampening", [0.0, 0.3])
def test_grad_scaler_skipped_first_sgd_step(dampening):
    """A skipped first step leaves the new momentum buffers to the next step: the run equals one
    that starts a step later (GradScaler's power-of-two unscaling is exact)."""
    shapes = ((64, 33), (1000,))
    init = make_params(shapes, seed=5)
    bank = DeviceGrads(init, torch.float32)
    runs = []
    for skip_first in (True, False):
        params = [p.clone().requires_grad_() for p in init]
        opt = ia.SGD(params, lr=1e-2, momentum=0.9, dampening=dampening, nesterov=False)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)
        for t in range(0 if skip_first else 1, 5):
            opt.zero_grad(set_to_none=True)
            scaler.scale(torch.ones((), device=DEVICE))  # what a loss would: the scale exists from here
            for p, g in zip(params, bank.grads(t)):
                p.grad = g * scaler.get_scale()
            if t == 0:
                params[0].grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
        assert torch.equal(oa.state[p]["momentum_buffer"], ob.state[q]["momentum_buffer"])


# ---- no host synchronisation -----------------------------------------------------------------------


@pytest.mark.parametrize("lr", [1e-3, "tensor:1e-3"], ids=["lr-float", "lr-tensor"])
@pytest.mark.parametrize("key", sorted(STATS_KWARGS))
def test_no_host_sync_during_steps(key, lr):
    name = key.split("-")[0]
    params = small_model_params(DEVICE)
    opt = CLASSES[name][0](params, **device_kwargs({**STATS_KWARGS[key], "lr": lr}))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step builds the layout and state (a synchronous upload; docs/cuda.md)
    opt.end_epoch()
    opt.step()  # and the first step after an epoch boundary re-plans
    run_without_host_sync(random_grads_step(opt, params))


@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adagrad"])
def test_no_host_sync_with_grad_scaler(name):
    """SGD's first step with new buffers under GradScaler reads found_inf on the host only with
    dampening != 0 (classic.py, _first_step_skipped): here dampening is 0 from the start."""
    params = small_model_params(DEVICE)
    weights = [torch.randn_like(p) for p in params]
    kwargs = dict(STATS_KWARGS[name])
    if name == "SGD":
        kwargs["dampening"] = 0.0
    opt = CLASSES[name][0](params, **kwargs)
    train_step = grad_scaler_train_step(opt, params, weights)

    # the very first step builds the layout (a synchronous upload); it does not read found_inf
    for p in params:
        p.grad = torch.zeros_like(p)
    train_step()
    run_without_host_sync(train_step)


# ---- CUDA graphs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["SGD", "RMSprop", "Adagrad"])
def test_cuda_graph_replay_matches_eager(key):
    """A captured step (no host synchronisation, no allocation outside the caching allocator)
    replayed N times gives bitwise the parameters, state and statistics of N eager steps."""
    name = key.split("-")[0]
    cls = CLASSES[name][0]
    kwargs = STATS_KWARGS[key]
    init = make_params(((64, 33), (33,), (1000,), (CHUNK + 9,)), seed=1)
    bank = DeviceGrads(init, torch.float32)
    grads = [bank.grads(t) for t in range(10)]
    eager_p = [p.clone().requires_grad_() for p in init]
    graph_p = [p.clone().requires_grad_() for p in init]
    eager = cls(eager_p, **kwargs)
    graphed = cls(graph_p, **kwargs)
    for p in graph_p:
        p.grad = torch.zeros_like(p)  # static gradients the graph reads

    assert_graph_replay_matches_eager(eager, graphed, eager_p, graph_p, grads)


def test_compact_epoch_buffers_are_refused_on_cuda_with_a_clear_error():
    """The CUDA classic kernels read the previous epoch's step in the parameter's dtype only: a
    compact (bf16) one is refused by the op before anything changes, with what to do instead."""
    params = small_model_params(DEVICE)
    opt = ia.SGD(params, lr=1e-2, momentum=0.9, epoch_buffers="compact")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.end_epoch()
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="compact epoch buffers for SGD, RMSprop and Adagrad run on CPU"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
