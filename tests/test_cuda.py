"""The CUDA kernel (csrc/cuda/): parity with torch's fused CUDA optimizers, the statistics, and the
promises of docs/cuda.md (no host synchronisation, CUDA graphs, GradScaler). Skipped without a GPU.

Run on a GPU machine after `python setup.py build_ext --inplace`:  python -m pytest tests/test_cuda.py

What is asserted, and why:

* Adam / AdamW, fp32, bf16, fp16 and fp64: bitwise equal (torch.equal) to torch.optim.Adam/AdamW
  (fused=True) on the same GPU, parameters and every state tensor, for weight decay, amsgrad,
  maximize, lr as a float and as a device tensor, statistics on and off. Our kernel spells out
  torch's CUDA arithmetic operation for operation (csrc/adam_math.h, torch_cuda; setup.py picks
  the form the installed torch uses) with correctly rounded intrinsics, so only a different
  compiler contraction in torch's own build or a different nvcc pow could break this.
* Statistics on / off: bitwise identical parameters and state (the statistics only read values),
  for every algorithm and storage type, and independent of how the work is split into launches.
* Adamax: torch has no fused Adamax. Against torch's foreach path (its own CUDA kernels, with a
  different lerp and addcdiv rounding) to a tolerance; against our CPU kernel (the same formulas,
  adam_math.h) to ~1 ulp (bitwise unless the device and host pow differ in the last place).
* Statistics: against float64 sums computed from the kernel's own inputs and outputs, to 1e-5
  of the sum of |terms| (fp32 per-thread partials), for odd sizes, many small tensors, misaligned
  tensors and tensors split over several launches.
* No host synchronisation: steps under torch.cuda.set_sync_debug_mode("error") raise nothing
  (after a first step, which builds the optimizer's layout; see docs/cuda.md).
* CUDA graphs: a captured step replayed N times gives bitwise the parameters, state and
  statistics of N eager steps.
* GradScaler: an injected inf skips the step exactly as torch's fused Adam does (parameters, state
  and step counters bitwise equal to torch's), and that step's statistics are zero.
"""

from __future__ import annotations

import math

import pytest
import torch

import instrumented_adam as ia
from instrumented_adam import NUM_STATS, STAT_INDEX, STAT_NAMES, Algorithm
from conftest import (assert_graph_replay_matches_eager, assert_same_state, grad_scaler_train_step,
                      random_grads_step, run_without_host_sync, small_model_params)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
op = torch.ops.instrumented_adam.adam_step

# Chunk of one thread block (csrc/cuda/adam_cuda.h, kChunk); sizes below straddle it.
CHUNK = 32768
#: Odd sizes: vector tails for every storage type (4 fp32, 8 bf16/fp16, 2 fp64 per 16-byte load),
#: a chunk boundary, several chunks.
SIZES = (1, 3, 7, 8, 9, 17, 31, 1000, 4099, (33, 65), CHUNK - 1, CHUNK + 5, 100003)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def test_cuda_kernel_is_registered():
    """A CUDA machine must have the CUDA kernel: a build without it fails here, not by skipping."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("instrumented_adam::adam_step", "CUDA"), (
        "instrumented_adam was built without its CUDA kernel: rebuild with `python setup.py build_ext "
        "--inplace` on this machine (docs/cuda.md)"
    )


# ---- helpers ---------------------------------------------------------------------------------------


def make_params(sizes, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    out = []
    for n in sizes:
        shape = n if isinstance(n, tuple) else (n,)
        out.append((torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float64) * scale).to(dtype))
    return out


def make_grads(params, step, seed=1):
    gen = torch.Generator(device=DEVICE).manual_seed(seed * 1000 + step)
    factor = 0.25 + (step % 5)  # the magnitude varies over the steps too
    return [(torch.randn(p.shape, generator=gen, device=DEVICE, dtype=torch.float64) * factor).to(p.dtype)
            for p in params]


def materialise(kwargs):
    """"tensor:<lr>" becomes a fresh float32 device tensor per optimizer, as a user passes it."""
    out = dict(kwargs)
    if isinstance(out.get("lr"), str):
        out["lr"] = torch.tensor(float(out["lr"].split(":")[1]), dtype=torch.float32, device=DEVICE)
    return out


def run_pair(ours_cls, torch_cls, sizes, kwargs, torch_kwargs, *, statistics=True, steps=12, dtype=torch.float32,
             epoch_every=0):
    params = make_params(sizes, dtype)
    ours_p = [p.clone().requires_grad_() for p in params]
    theirs_p = [p.clone().requires_grad_() for p in params]
    ours = ours_cls(ours_p, **materialise(kwargs), statistics=statistics, epoch_geometry=epoch_every > 0)
    theirs = torch_cls(theirs_p, **materialise(kwargs), **torch_kwargs)
    for t in range(steps):
        grads = make_grads(params, t)
        for p, q, g in zip(ours_p, theirs_p, grads):
            p.grad = g.clone()
            q.grad = g.clone()
        ours.step()
        theirs.step()
        if epoch_every and t % epoch_every == epoch_every - 1:
            ours.end_epoch()
    return ours, theirs, ours_p, theirs_p


# ---- parity with torch.optim.Adam/AdamW(fused=True) -------------------------------------------------

CONFIGS = {
    "adam": ("Adam", dict(lr=1e-2)),
    "adam-wd": ("Adam", dict(lr=1e-2, weight_decay=0.05)),
    "adam-amsgrad": ("Adam", dict(lr=1e-2, amsgrad=True)),
    "adam-maximize": ("Adam", dict(lr=1e-2, maximize=True)),
    "adam-beta1-low": ("Adam", dict(lr=1e-2, betas=(0.3, 0.95))),
    "adam-lr-tensor": ("Adam", dict(lr="tensor:3e-3")),
    "adam-everything": ("Adam", dict(lr="tensor:5e-3", betas=(0.2, 0.9), eps=1e-6, weight_decay=0.02,
                                     amsgrad=True, maximize=True)),
    "adamw": ("AdamW", dict(lr=1e-2)),
    "adamw-wd-amsgrad": ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True, betas=(0.4, 0.99))),
    "adamw-maximize-lr-tensor": ("AdamW", dict(lr="tensor:2e-2", maximize=True, weight_decay=0.3)),
}
TORCH_CLS = {"Adam": (ia.Adam, torch.optim.Adam), "AdamW": (ia.AdamW, torch.optim.AdamW)}


@pytest.mark.parametrize("statistics", [True, False], ids=["stats", "nostats"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_fp32_bitwise_vs_torch_fused(config, statistics):
    name, kwargs = CONFIGS[config]
    ours_cls, torch_cls = TORCH_CLS[name]
    ours, theirs, op_, tp = run_pair(ours_cls, torch_cls, SIZES, kwargs, dict(fused=True), statistics=statistics)
    assert_same_state(ours, theirs, op_, tp, config)


def test_fp32_bitwise_vs_torch_fused_with_epochs():
    """Epoch boundaries make the kernel read the previous epoch's step too (stats=on+prev)."""
    ours, theirs, op_, tp = run_pair(ia.AdamW, torch.optim.AdamW, SIZES, dict(lr=1e-2, weight_decay=0.1),
                                     dict(fused=True), steps=15, epoch_every=5)
    assert_same_state(ours, theirs, op_, tp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("config", ["adam", "adam-everything", "adamw-wd-amsgrad"])
def test_other_dtypes_bitwise_vs_torch_fused(config, dtype):
    """bf16/fp16 compute in fp32 registers and round once per store, as torch's kernel does; fp64
    computes in double. State dtype = parameter dtype in both."""
    name, kwargs = CONFIGS[config]
    ours_cls, torch_cls = TORCH_CLS[name]
    ours, theirs, op_, tp = run_pair(ours_cls, torch_cls, SIZES, kwargs, dict(fused=True), dtype=dtype)
    assert_same_state(ours, theirs, op_, tp, f"{config} {dtype}")


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_statistics_do_not_change_the_update(name, dtype):
    """statistics=True and statistics=False (the plain update kernel) give bitwise the same state."""
    cls = {"Adam": ia.Adam, "AdamW": ia.AdamW, "Adamax": ia.Adamax}[name]
    kwargs = dict(lr=1e-2, weight_decay=0.05)
    if name != "Adamax":
        kwargs["amsgrad"] = True
    params = make_params(SIZES, dtype)
    runs = []
    for statistics in (True, False):
        ps = [p.clone().requires_grad_() for p in params]
        opt = cls(ps, **kwargs, statistics=statistics, epoch_geometry=statistics)
        for t in range(10):
            for p, g in zip(ps, make_grads(params, t)):
                p.grad = g
            opt.step()
            if statistics and t == 4:
                opt.end_epoch()  # from here on the kernel also reads the previous epoch's step
        runs.append((opt, ps))
    (a, ap), (b, bp) = runs
    for p, q in zip(ap, bp):
        assert torch.equal(p, q)
        for k, v in b.state[q].items():
            assert torch.equal(a.state[p][k], v), k


# ---- Adamax -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, torch_kwargs", [
    (dict(lr=2e-3), dict(foreach=True)),
    (dict(lr=2e-3, weight_decay=0.1, maximize=True), dict(foreach=True)),
    # torch's foreach Adamax takes a tensor lr only when capturable
    (dict(lr="tensor:1e-3", betas=(0.3, 0.9)), dict(foreach=True, capturable=True)),
], ids=["plain", "wd-max", "lr-tensor"])
def test_adamax_vs_torch_foreach(kwargs, torch_kwargs):
    ours, theirs, op_, tp = run_pair(ia.Adamax, torch.optim.Adamax, SIZES, kwargs, torch_kwargs)
    for p, q in zip(op_, tp):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.state[p]["exp_inf"], theirs.state[q]["exp_inf"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours.state[p]["exp_avg"], theirs.state[q]["exp_avg"], rtol=1e-5, atol=1e-7)
        assert torch.equal(ours.state[p]["step"].cpu(), theirs.state[q]["step"].cpu())


@pytest.mark.parametrize("lr", [2e-3, "tensor:1e-3"], ids=["lr-float", "lr-tensor"])
def test_adamax_cuda_vs_cpu_kernel(lr):
    """Both kernels run adam_math.h's Adamax formulas; only pow (device vs host libm) may differ."""
    params = make_params(SIZES, torch.float32)
    results = []
    for device in ("cuda", "cpu"):
        ps = [p.detach().to(device).clone().requires_grad_() for p in params]
        lr_arg = torch.tensor(float(lr.split(":")[1]), device=device) if isinstance(lr, str) else lr
        opt = ia.Adamax(ps, lr=lr_arg, weight_decay=0.05)
        for t in range(10):
            for p, g in zip(ps, make_grads(params, t)):
                p.grad = g.to(device)
            opt.step()
        results.append((opt, ps))
    (a, ap), (b, bp) = results
    for p, q in zip(ap, bp):
        torch.testing.assert_close(p.cpu(), q, rtol=4e-7, atol=1e-9)
        torch.testing.assert_close(a.state[p]["exp_inf"].cpu(), b.state[q]["exp_inf"], rtol=4e-7, atol=1e-12)
    assert_rows_close(a.last_step_statistics().values, b.last_step_statistics().values)


# ---- statistics against float64 sums ----------------------------------------------------------------


class OpState:
    """Raw op arguments for one list of parameters (no optimizer in between)."""

    def __init__(self, params, algorithm, amsgrad=False, prev=False, seed=5):
        self.params = params
        self.algorithm = algorithm
        self.amsgrad = amsgrad and algorithm != Algorithm.ADAMAX
        self.exp_avgs = [torch.zeros_like(p) for p in params]
        self.seconds = [torch.zeros_like(p) for p in params]
        self.maxes = [torch.zeros_like(p) for p in params] if self.amsgrad else []
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        self.prevs = [(torch.randn(p.shape, generator=gen, device=DEVICE) * 1e-2).to(p.dtype) for p in params] if prev else []
        self.steps = [torch.zeros((), dtype=torch.float32, device=DEVICE) for _ in params]
        self.hyper = dict(lr=3e-3, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, maximize=False)

    def step(self, grads, stats=None, stat_rows=(), grad_scale=None, found_inf=None, lr_tensor=None):
        op(self.params, grads, self.exp_avgs, self.seconds, self.maxes, self.prevs, self.steps,
           algorithm=int(self.algorithm), lr_tensor=lr_tensor, amsgrad=self.amsgrad, grad_scale=grad_scale,
           found_inf=found_inf, stats=stats, stat_rows=list(stat_rows), **self.hyper)

    def clone(self):
        other = OpState.__new__(OpState)
        other.__dict__ = {k: ([t.clone() for t in v] if isinstance(v, list) else (dict(v) if isinstance(v, dict) else v))
                          for k, v in self.__dict__.items()}
        return other


def expected_row(st: OpState, i, p_old, grad, step):
    """The statistics of tensor i from the op's inputs (p_old, grad) and outputs, in float64."""
    h = st.hyper
    g = grad.double().reshape(-1)
    d = st.params[i].double().reshape(-1) - p_old.double().reshape(-1)
    m = st.exp_avgs[i].double().reshape(-1)
    if st.algorithm == Algorithm.ADAMAX:
        moment = st.seconds[i].double().reshape(-1)
        eff = h["lr"] / ((1 - h["beta1"] ** step) * moment)
    else:
        moment = (st.maxes[i] if st.amsgrad else st.seconds[i]).double().reshape(-1)
        eff = h["lr"] / ((1 - h["beta1"] ** step) * (moment.sqrt() / math.sqrt(1 - h["beta2"] ** step) + h["eps"]))
    p = st.params[i].double().reshape(-1)
    prev = st.prevs[i].double().reshape(-1) if st.prevs else torch.zeros_like(d)
    terms = {
        "grad_sumsq": g * g, "exp_avg_sumsq": m * m, "second_moment_sum": moment, "update_sumsq": d * d,
        "param_sumsq": p * p, "update_dot_grad": d * g, "exp_avg_dot_grad": m * g, "update_dot_prev_epoch": d * prev,
        "nonfinite_grads": (~torch.isfinite(g)).double(), "eff_lr_sum": eff,
    }
    values = {k: (v.sum().item(), v.abs().sum().item()) for k, v in terms.items()}
    values["eff_lr_max"] = (eff.max().item() if eff.numel() else 0.0, eff.abs().max().item() if eff.numel() else 0.0)
    return values


def assert_stats_close(row, expected, msg="", rel=1e-5):
    assert row.dtype == torch.float64
    got = row.tolist()
    for name in STAT_NAMES:
        value, scale = expected[name]
        tol = (2e-6 if name == "eff_lr_max" else rel) * scale + 1e-300
        assert abs(got[STAT_INDEX[name]] - value) <= tol, (
            f"{msg} {name}: kernel {got[STAT_INDEX[name]]!r}, float64 {value!r} (tolerance {tol:.3g})")


def assert_rows_close(a, b, rel=1e-5):
    """Statistics rows of two kernels: each sum to `rel` of its magnitude, a dot product to `rel` of
    the product of the norms (Cauchy-Schwarz bound of the sum of |terms|)."""
    a, b = a.double().cpu(), b.double().cpu()
    assert a.shape == b.shape
    dots = {"update_dot_grad": ("update_sumsq", "grad_sumsq"), "exp_avg_dot_grad": ("exp_avg_sumsq", "grad_sumsq")}
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


def run_stats_case(sizes, algorithm, amsgrad=False, prev=False, dtype=torch.float32, steps=3, params=None):
    params = params if params is not None else make_params(sizes, dtype, seed=11)
    st = OpState(params, algorithm, amsgrad=amsgrad, prev=prev)
    stats = torch.full((len(params), NUM_STATS), float("nan"), dtype=torch.float64, device=DEVICE)
    for t in range(steps):
        grads = make_grads(params, t, seed=3)
        p_old = [p.clone() for p in params]
        st.step(grads, stats=stats)
    for i in range(len(params)):
        assert_stats_close(stats[i], expected_row(st, i, p_old[i], grads[i], steps), f"tensor {i} (numel {params[i].numel()})")
    return st, stats


@pytest.mark.parametrize("algorithm", list(Algorithm), ids=lambda a: a.name)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
def test_statistics_vs_float64_odd_sizes(algorithm, amsgrad):
    if amsgrad and algorithm == Algorithm.ADAMAX:
        pytest.skip("Adamax has no amsgrad")
    run_stats_case(SIZES, algorithm, amsgrad=amsgrad, prev=True)


def test_statistics_vs_float64_many_small_tensors():
    """300 tensors: more than one launch takes (kMaxTensorsPerLaunch = 128)."""
    gen = torch.Generator().manual_seed(3)
    sizes = [int(n) for n in torch.randint(1, 70, (300,), generator=gen)]
    run_stats_case(sizes, Algorithm.ADAM, prev=True)


def test_statistics_vs_float64_bf16():
    """bf16 storage: the kernel's m and moment are the fp32 values before rounding to storage,
    the reference sees the stored ones: a looser tolerance for those sums."""
    params = make_params((1000, 4099, CHUNK + 5), torch.bfloat16, seed=11)
    st = OpState(params, Algorithm.ADAMW)
    stats = torch.zeros((len(params), NUM_STATS), dtype=torch.float64, device=DEVICE)
    for t in range(3):
        grads = make_grads(params, t, seed=3)
        p_old = [p.clone() for p in params]
        st.step(grads, stats=stats)
    for i in range(len(params)):
        exp = expected_row(st, i, p_old[i], grads[i], 3)
        got = stats[i].tolist()
        for name in ("grad_sumsq", "update_sumsq", "param_sumsq", "update_dot_grad", "nonfinite_grads"):
            value, scale = exp[name]
            assert abs(got[STAT_INDEX[name]] - value) <= 1e-5 * scale + 1e-300, name
        for name in ("exp_avg_sumsq", "second_moment_sum", "exp_avg_dot_grad", "eff_lr_sum"):
            value, scale = exp[name]
            assert abs(got[STAT_INDEX[name]] - value) <= 2e-2 * scale, name  # bf16 rounding of m, v


def test_split_launches_and_misaligned_tensors(monkeypatch):
    """Tiny launch capacities split tensors over several launches (a tensor larger than one launch);
    a view at an odd offset takes the unaligned path. Parameters bitwise equal to an unsplit,
    aligned run; statistics identical for the split (same per-chunk partials, same order) and
    close for the misaligned tensor (another assignment of elements to threads)."""
    base = make_params((5 * CHUNK + 11,), seed=2)[0]
    sizes = (7 * CHUNK + 3, 1, 5000, 2 * CHUNK)
    params = make_params(sizes, seed=4)
    misaligned = base[1:].clone()  # aligned copy of the view's values, for the reference
    view_storage = base.clone()
    view = view_storage[1:]  # data pointer 4 bytes past a 512-byte boundary
    assert view.data_ptr() % 16 != 0

    ref = OpState([p.clone() for p in params] + [misaligned], Algorithm.ADAM, amsgrad=True, prev=True)
    split = OpState([p.clone() for p in params] + [view], Algorithm.ADAM, amsgrad=True, prev=True)
    split.prevs = [t.clone() for t in ref.prevs]
    ref_stats = torch.zeros((len(ref.params), NUM_STATS), dtype=torch.float64, device=DEVICE)
    split_stats = torch.zeros_like(ref_stats)
    for t in range(3):
        grads = make_grads(ref.params, t)
        p_old = [p.clone() for p in split.params]
        ref.step([g.clone() for g in grads], stats=ref_stats)
        monkeypatch.setenv("IA_CUDA_MAX_BLOCKS_PER_LAUNCH", "3")
        monkeypatch.setenv("IA_CUDA_MAX_TENSORS_PER_LAUNCH", "2")
        split.step([g.clone() for g in grads], stats=split_stats)
        monkeypatch.delenv("IA_CUDA_MAX_BLOCKS_PER_LAUNCH")
        monkeypatch.delenv("IA_CUDA_MAX_TENSORS_PER_LAUNCH")
    for a, b in zip(ref.params + ref.exp_avgs + ref.seconds + ref.maxes, split.params + split.exp_avgs + split.seconds + split.maxes):
        assert torch.equal(a, b)
    assert torch.equal(torch.stack(ref.steps), torch.stack(split.steps))
    n = len(params)
    assert torch.equal(ref_stats[:n], split_stats[:n]), "splitting launches must not change the statistics"
    # The misaligned tensor: elements go to threads differently, so only close to the aligned run.
    assert_stats_close(split_stats[n], expected_row(split, n, p_old[n], grads[n], 3), "misaligned")
    assert_stats_close(ref_stats[n], expected_row(ref, n, p_old[n], grads[n], 3), "aligned copy")


def test_stat_rows_found_inf_and_grad_scale():
    """stat_rows maps tensors to rows (other rows zeroed); found_inf changes nothing but zeroes the
    statistics; grad_scale unscales the gradients in place, as torch's fused kernels do."""
    params = make_params((100, 3000, 7))
    st = OpState(params, Algorithm.ADAM)
    stats = torch.full((6, NUM_STATS), 7.0, dtype=torch.float64, device=DEVICE)
    grads = make_grads(params, 0)
    scale = torch.tensor(1024.0, device=DEVICE)
    scaled = [g * 1024.0 for g in grads]

    # found_inf: no change at all, statistics zero, gradients not unscaled
    before = st.clone()
    found = torch.ones((), device=DEVICE)
    scaled_copy = [g.clone() for g in scaled]
    st.step(scaled_copy, stats=stats, stat_rows=[4, 0, 2], grad_scale=scale, found_inf=found)
    for a, b in zip(st.params + st.exp_avgs + st.seconds + st.steps, before.params + before.exp_avgs + before.seconds + before.steps):
        assert torch.equal(a, b)
    assert torch.equal(stats, torch.zeros_like(stats))
    for a, b in zip(scaled_copy, scaled):
        assert torch.equal(a, b)

    # a real step with the scale: rows 4, 0, 2 filled, the others zero; gradients unscaled in place
    stats.fill_(7.0)
    p_old = [p.clone() for p in st.params]
    st.step(scaled_copy, stats=stats, stat_rows=[4, 0, 2], grad_scale=scale, found_inf=torch.zeros((), device=DEVICE))
    for a, g in zip(scaled_copy, grads):
        assert torch.equal(a, g)  # (g * 1024) / 1024 is exact
    for row in (1, 3, 5):
        assert torch.equal(stats[row], torch.zeros_like(stats[row]))
    for i, row in enumerate((4, 0, 2)):
        assert_stats_close(stats[row], expected_row(st, i, p_old[i], grads[i], 1))
    assert [s.item() for s in st.steps] == [1.0, 1.0, 1.0]


def test_bad_arguments_leave_state_untouched():
    params = make_params((100, 5))
    st = OpState(params, Algorithm.ADAM)
    before = st.clone()
    grads = make_grads(params, 0)
    st.steps[1] = torch.zeros((), dtype=torch.float32)  # on the CPU: rejected
    with pytest.raises(RuntimeError, match="state_steps"):
        st.step(grads)
    st.steps[1] = before.steps[1].clone()
    with pytest.raises(RuntimeError, match="stat row"):
        st.step(grads, stats=torch.zeros((2, NUM_STATS), dtype=torch.float64, device=DEVICE), stat_rows=[1, 1])
    for a, b in zip(st.params + st.exp_avgs + st.seconds, before.params + before.exp_avgs + before.seconds):
        assert torch.equal(a, b)


# ---- no host synchronisation, CUDA graphs, GradScaler ----------------------------------------------


@pytest.mark.parametrize("lr", [1e-3, "tensor:1e-3"], ids=["lr-float", "lr-tensor"])
def test_no_host_sync_during_steps(lr):
    params = small_model_params(DEVICE)
    opt = ia.AdamW(params, **materialise(dict(lr=lr)), weight_decay=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step builds the layout and state (a synchronous upload; docs/cuda.md)
    opt.end_epoch()
    opt.step()  # and the first step after an epoch boundary re-plans
    run_without_host_sync(random_grads_step(opt, params))


def test_no_host_sync_with_grad_scaler():
    params = small_model_params(DEVICE)
    weights = [torch.randn_like(p) for p in params]
    opt = ia.Adam(params, lr=1e-3)
    train_step = grad_scaler_train_step(opt, params, weights)

    train_step()
    run_without_host_sync(train_step)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax"])
def test_cuda_graph_replay_matches_eager(name):
    cls = {"Adam": ia.Adam, "AdamW": ia.AdamW, "Adamax": ia.Adamax}[name]
    kwargs = dict(lr=torch.tensor(1e-2, device=DEVICE), weight_decay=0.05, capturable=True)
    init = make_params(((64, 33), (33,), (1000,), (CHUNK + 9,)), seed=1)
    grads = [make_grads(init, t) for t in range(10)]
    eager_p = [p.clone().requires_grad_() for p in init]
    graph_p = [p.clone().requires_grad_() for p in init]
    eager = cls(eager_p, **kwargs)
    graphed = cls(graph_p, **{**kwargs, "lr": kwargs["lr"].clone()})
    for p in graph_p:
        p.grad = torch.zeros_like(p)  # static gradients the graph reads

    assert_graph_replay_matches_eager(eager, graphed, eager_p, graph_p, grads)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_grad_scaler_inf_step_matches_torch_fused(name):
    ours_cls, torch_cls = TORCH_CLS[name]
    init = make_params(((64, 33), (33,), (1000,)), seed=2)
    weights = make_params(((64, 33), (33,), (1000,)), seed=3)
    runs = []
    for cls, extra in ((ours_cls, {}), (torch_cls, dict(fused=True))):
        params = [p.clone().requires_grad_() for p in init]
        opt = cls(params, lr=1e-2, weight_decay=0.01, **extra)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10, growth_interval=2)
        runs.append((params, opt, scaler))
    inf_step = 3
    for t in range(7):
        for params, opt, scaler in runs:
            opt.zero_grad(set_to_none=True)
            loss = sum((p * w).sum() + 0.5 * (p * p * p).sum() for p, w in zip(params, weights))
            scaler.scale(loss).backward()
            if t == inf_step:
                params[1].grad[3] = float("inf")
            scaler.step(opt)
            scaler.update()
        (op_, ours, s_ours), (tp, theirs, s_theirs) = runs
        assert_same_state(ours, theirs, op_, tp, f"step {t}")
        assert s_ours.get_scale() == s_theirs.get_scale()
        stats = ours.last_step_statistics().values
        if t == inf_step:
            assert torch.equal(stats, torch.zeros_like(stats)), "a skipped step has zero statistics"
        else:
            assert (stats[:, STAT_INDEX["grad_sumsq"]] > 0).all()
    assert ours.state[op_[0]]["step"].item() == 6.0  # seven steps, one skipped
