"""Compact epoch buffers (`epoch_buffers="compact"`, the default) against the exact mode.

The compact mode keeps θ at the epoch start exact and the previous epoch's step s_{k−1} in
bfloat16 (θ_0 only with `distance_from_init=True`, also in bfloat16). docs/design.md ("Epoch
geometry") states the error of each figure; these tests run both modes on the same parameters and
gradients and check every compact figure against the exact one within that stated error, the
memory the default settings take, the kernels' bf16 loads (bitwise the statistics of the same
values held in the parameter's dtype, on every instruction set), and state_dict round trips across
the modes and with torch.optim.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import instrumented_adam as ia
from instrumented_adam import EPOCH_COLUMNS, STAT_NAMES
from instrumented_adam.core import _ops
from instrumented_adam.core.optimizer import _Instrumented

from conftest import GradBank, ODD_SIZES, assert_same_state, make_params, run_isa_subprocess, set_grads

#: bf16's unit roundoff (8 significant bits), plus the float rounding before it (torch's and our
#: double → bf16 conversion goes through float): the relative error of each stored element.
U = 2.0**-8 * (1 + 2.0**-15)
#: The exact mode's own error: s_{k−1} in fp32 (2^-24 per element) and the kernel's statistics
#: (≤ 7e-7 relative to Σ|terms|, docs/design.md "Accuracy"), both relative to the same products.
EXACT_SLACK = 1e-6
SIZES = (7, 33, 1000, 4099)
COL = {name: j for j, name in enumerate(EPOCH_COLUMNS)}
DOT_PREV = STAT_NAMES.index("update_dot_prev_epoch")


def _train(opt, params, bank, epochs, steps_per_epoch):
    """Steps and epoch ends; returns the per-step statistics and the epoch geometries."""
    steps, geometries, t = [], [], 0
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            set_grads(params, bank.grads(t), clone=True)
            opt.step()
            steps.append(opt.last_step_statistics().values.clone())
            t += 1
        geometries.append(opt.end_epoch().values.clone())
    return steps, geometries


def test_state_nbytes_counts_each_state_storage_once():
    """torch's own Adam: m and v (4 B each per fp32 element) and a 4-byte step per parameter; a
    state tensor that views another's storage counts once."""
    params = make_params((4096, 1000, 7))
    opt = torch.optim.Adam(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    numel = sum(p.numel() for p in params)
    assert ia.state_nbytes(opt) == 8 * numel + 4 * len(params)
    state = opt.state[params[0]]
    state["view"] = state["exp_avg"][:10]
    assert ia.state_nbytes(opt) == 8 * numel + 4 * len(params)


def test_default_state_is_at_most_14_bytes_per_element():
    """Adam's m and v (8 B) + θ_end exact (4 B) + s_{k−1} in bf16 (2 B) for fp32 parameters; the
    exact mode keeps 20 B, as before (θ_end, s_{k−1}, θ_0 in fp32)."""
    figures = {}
    for kwargs in ({}, {"epoch_buffers": "exact"}, {"distance_from_init": True}):
        params = make_params((4096, 1000, 7))
        numel = sum(p.numel() for p in params)
        opt = ia.Adam(params, lr=1e-2, **kwargs)
        bank = GradBank([tuple(p.shape) for p in params])
        _train(opt, params, bank, epochs=2, steps_per_epoch=2)
        step_bytes = 4 * len(params)  # the 0-d float32 step counters
        figures[tuple(kwargs.items())] = (ia.state_nbytes(opt) - step_bytes) / numel
    assert figures[()] == 14.0
    assert figures[(("epoch_buffers", "exact"),)] == 20.0
    assert figures[(("distance_from_init", True),)] == 16.0


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax", "SGD", "RMSprop", "Adagrad"])
def test_compact_figures_within_stated_error_of_exact(name):
    """Same parameters, gradients and updates in both modes (the buffers never change the update);
    every epoch and per-step figure of the compact mode within its stated error of the exact one."""
    cls = getattr(ia, name)
    bank = GradBank(SIZES)
    runs = {}
    for mode in ("exact", "compact"):
        params = make_params(SIZES)
        opt = cls(params, lr=1e-2, epoch_buffers=mode, distance_from_init=True)
        theta0 = [p.detach().double().clone() for p in params]
        runs[mode] = (opt, params, theta0, *_train(opt, params, bank, epochs=4, steps_per_epoch=3))
    exact_opt, exact_params, theta0, exact_steps, exact_geo = runs["exact"]
    compact_opt, compact_params, _, compact_steps, compact_geo = runs["compact"]
    for p, q in zip(exact_params, compact_params):
        assert torch.equal(p, q)
    assert compact_opt.state[compact_params[0]]["prev_epoch_step"].dtype == torch.bfloat16
    assert compact_opt.state[compact_params[0]]["initial_param"].dtype == torch.bfloat16

    theta0_norm = [float(t.norm()) for t in theta0]
    for k, (e, c) in enumerate(zip(exact_geo, compact_geo)):
        # ‖s_k‖² comes from the exact θ_end in both modes: bitwise.
        assert torch.equal(e[:, COL["step_sumsq"]], c[:, COL["step_sumsq"]])
        step_norm = e[:, COL["step_sumsq"]].sqrt()
        prev_norm = e[:, COL["prev_step_sumsq"]].sqrt()
        # ⟨s_k, s_{k−1}⟩: |error| ≤ U·‖s_k‖·‖s_{k−1}‖ (Cauchy–Schwarz on the per-element rounding).
        bound = (U + EXACT_SLACK) * step_norm * prev_norm
        assert ((c[:, COL["step_dot_prev"]] - e[:, COL["step_dot_prev"]]).abs() <= bound).all(), k
        # ‖s_{k−1}‖²: relative error ≤ 2U + U².
        rel = (2 * U + U * U + EXACT_SLACK) * e[:, COL["prev_step_sumsq"]]
        assert ((c[:, COL["prev_step_sumsq"]] - e[:, COL["prev_step_sumsq"]]).abs() <= rel).all(), k
        # ‖θ − θ_0‖ with θ_0 in bf16: |error| ≤ ‖θ_0 − bf16(θ_0)‖ ≤ U·‖θ_0‖ (triangle inequality).
        for i in range(len(SIZES)):
            d_c = math.sqrt(c[i, COL["distance_sumsq"]])
            d_e = math.sqrt(e[i, COL["distance_sumsq"]])
            assert abs(d_c - d_e) <= U * theta0_norm[i] + EXACT_SLACK * d_e, (k, i)
        if k > 0:  # the cosine between consecutive epoch steps: |error| ≤ 3U (see docs/design.md)
            cos_e = e[:, COL["step_dot_prev"]] / (step_norm * prev_norm)
            cos_c = c[:, COL["step_dot_prev"]] / (step_norm * c[:, COL["prev_step_sumsq"]].sqrt())
            assert ((cos_c - cos_e).abs() <= 3 * U + EXACT_SLACK).all(), k
    # Per step: Σ Δθ·s_{k−1} within U·‖Δθ‖·‖s_{k−1}‖; every other statistic bitwise.
    for t, (e, c) in enumerate(zip(exact_steps, compact_steps)):
        others = [j for j in range(len(STAT_NAMES)) if j != DOT_PREV]
        assert torch.equal(e[:, others], c[:, others]), t
        epoch = t // 3
        if epoch == 0:
            assert (c[:, DOT_PREV] == 0).all()
            continue
        # s_{k−1} during epoch `epoch` is the step measured at the end of epoch `epoch − 1`.
        s_prev_norm = exact_geo[epoch - 1][:, COL["step_sumsq"]].sqrt()
        update_norm = e[:, STAT_NAMES.index("update_sumsq")].sqrt()
        bound = (U + EXACT_SLACK) * update_norm * s_prev_norm
        assert ((c[:, DOT_PREV] - e[:, DOT_PREV]).abs() <= bound).all(), t


def test_compact_default_does_not_measure_the_distance():
    """Without θ_0 the distance column is NaN (not measured), never a made-up 0."""
    params = make_params(SIZES)
    opt = ia.Adam(params, lr=1e-2)
    assert opt.epoch_buffers == "compact" and not opt.distance_from_init
    _, geometries = _train(opt, params, GradBank(SIZES), epochs=2, steps_per_epoch=2)
    assert geometries[-1][:, COL["distance_sumsq"]].isnan().all()
    assert torch.isfinite(geometries[-1][:, COL["step_sumsq"]]).all()
    assert "initial_param" not in opt.state[params[0]]


def _one_step(dtype, prevs, sizes):
    """One measured Adam step of fresh parameters; returns θ before, θ after and the statistics."""
    params = make_params(sizes, dtype)
    before = [p.detach().clone() for p in params]
    stats = torch.zeros(len(params), len(STAT_NAMES), dtype=torch.float64)
    ia.functional.adam(params, GradBank(sizes, dtype).grads(0), [torch.zeros_like(p) for p in params],
                       [torch.zeros_like(p) for p in params], [], [torch.zeros(()) for _ in params], lr=1e-2,
                       beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, prev_epoch_steps=prevs, stats=stats)
    return before, [p.detach() for p in params], stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_kernel_reads_bf16_previous_steps_exactly(dtype):
    """adam_step with bf16 previous steps: fp32/fp64 parameters give bitwise the statistics (and
    update) of the same values held in the parameter's dtype (the bf16 load is exact), on every
    SIMD tail length and across work items; fp16 parameters (whose type cannot hold every bf16
    value) give Σ Δθ·s_{k−1} within the statistics' bound of an fp64 computation."""
    sizes = ODD_SIZES + (65549,)
    prev_bf16 = [(1e-2 * torch.randn(s, generator=torch.Generator().manual_seed(i))).to(torch.bfloat16)
                 for i, s in enumerate(sizes)]
    _, after_bf16, stats_bf16 = _one_step(dtype, prev_bf16, sizes)
    if dtype != torch.float16:
        _, after_same, stats_same = _one_step(dtype, [p.to(dtype) for p in prev_bf16], sizes)
        assert torch.equal(stats_same, stats_bf16)
        for a, b in zip(after_same, after_bf16):
            assert torch.equal(a, b)
        return
    before, after, _ = _one_step(dtype, [], sizes)
    for i, (b, a, q) in enumerate(zip(before, after, prev_bf16)):
        terms = (a.double() - b.double()) * q.double()
        assert abs(stats_bf16[i, DOT_PREV].item() - terms.sum().item()) <= 1e-6 * terms.abs().sum().item(), i


@pytest.mark.isa_subprocess
def test_kernel_bf16_previous_steps_avx2_subprocess():
    """The AVX2 kernel's bf16 load (a widening load and a shift) in a child process."""
    run_isa_subprocess("test_epoch_buffers.py", "avx2", "AVX2", select="kernel_reads_bf16")


@pytest.mark.isa_subprocess
def test_kernel_bf16_previous_steps_default_isa_subprocess():
    run_isa_subprocess("test_epoch_buffers.py", "default", "DEFAULT", select="kernel_reads_bf16")


@pytest.mark.parametrize("has_initial", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_epoch_op_with_compact_buffers_matches_torch_path(dtype, has_initial):
    """The CPU epoch op with bf16 previous steps (and bf16 or no θ_0) and the chunked torch path
    (other devices) give the same figures and leave the same buffers."""
    g = torch.Generator().manual_seed(5)
    shapes = [(7,), (33, 5), (40000,)]
    theta = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    start = [(t.double() + 1e-2 * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(dtype) for t in theta]
    prev = [(1e-2 * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(torch.bfloat16) for t in theta]
    initial = [(t.double() + torch.randn(t.shape, generator=g, dtype=torch.float64)).to(torch.bfloat16) for t in theta]
    start_t, prev_t = [t.clone() for t in start], [t.clone() for t in prev]
    out = torch.empty(len(theta), len(EPOCH_COLUMNS) + 1, dtype=torch.float64)
    _ops.epoch_geometry(theta, start, prev, initial if has_initial else [], True, out)
    zero = torch.zeros((), dtype=torch.float64)
    for i, t in enumerate(theta):
        state = {"epoch_start_param": start_t[i], "prev_epoch_step": prev_t[i]}
        if has_initial:
            state["initial_param"] = initial[i]
        row, stored_sumsq = _Instrumented._epoch_row_torch(t, state, zero)
        torch.testing.assert_close(out[i, :4], row, rtol=1e-12, atol=1e-300, equal_nan=True)
        torch.testing.assert_close(out[i, 4], stored_sumsq, rtol=1e-12, atol=1e-300)
        assert torch.equal(prev[i], state["prev_epoch_step"]) and prev[i].dtype == torch.bfloat16
        assert torch.equal(start[i], t)
    assert out[:, COL["distance_sumsq"]].isnan().all() != has_initial


def _checkpoint_run(opt_factory, params, bank, t0, t1, epoch_every):
    opt = opt_factory(params)
    for t in range(t0, t1):
        set_grads(params, bank.grads(t), clone=True)
        opt.step()
        if t % epoch_every == epoch_every - 1 and hasattr(opt, "end_epoch"):
            opt.end_epoch()
    return opt


@pytest.mark.parametrize("saved, loaded", [("compact", "exact"), ("exact", "compact"), ("compact", "compact")])
def test_state_dict_across_modes(saved, loaded):
    """A checkpoint of one mode loads into the other: the update continues bitwise, the previous
    step is converted (exactly to fp32, rounded to bf16), and the next epoch's figures follow."""
    bank = GradBank(SIZES)
    params = make_params(SIZES)
    opt = ia.Adam(params, lr=1e-2, epoch_buffers=saved)
    for t in range(7):
        set_grads(params, bank.grads(t), clone=True)
        opt.step()
        if t % 3 == 2:
            opt.end_epoch()
    state_dict = copy.deepcopy(opt.state_dict())  # as from a file: no tensor shared with `opt`
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = ia.Adam(resumed_params, lr=1e-2, epoch_buffers=loaded)
    resumed.load_state_dict(state_dict)
    want = torch.bfloat16 if loaded == "compact" else torch.float32
    for p, q in zip(params, resumed_params):
        stored = opt.state[p]["prev_epoch_step"]
        assert resumed.state[q]["prev_epoch_step"].dtype == want
        assert torch.equal(resumed.state[q]["prev_epoch_step"], stored.to(want))
        assert torch.equal(resumed.state[q]["epoch_start_param"], opt.state[p]["epoch_start_param"])
        assert ("initial_param" in resumed.state[q]) == (loaded == "exact")
    for t in range(7, 10):
        for o, ps in ((opt, params), (resumed, resumed_params)):
            set_grads(ps, bank.grads(t), clone=True)
            o.step()
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
    a, b = opt.end_epoch().values, resumed.end_epoch().values
    assert torch.equal(a[:, COL["step_sumsq"]], b[:, COL["step_sumsq"]])
    if saved == loaded:
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    else:  # ⟨s_k, s_{k−1}⟩ of a converted s_{k−1}: the compact side's stated error
        norms = a[:, COL["step_sumsq"]].sqrt() * a[:, COL["prev_step_sumsq"]].sqrt()
        assert ((a[:, COL["step_dot_prev"]] - b[:, COL["step_dot_prev"]]).abs() <= (U + EXACT_SLACK) * norms).all()


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_compact_state_dict_with_torch_adam(direction):
    """torch.optim.Adam loads a compact checkpoint (it ignores the epoch buffers, which its load
    casts to fp32) and ours loads torch's; both continue bitwise like an uninterrupted torch run."""
    bank = GradBank(SIZES)
    reference = make_params(SIZES)
    ref_opt = _checkpoint_run(lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True), reference, bank, 0, 10, 100)
    first = make_params(SIZES)
    if direction == "torch_to_ours":
        saver = _checkpoint_run(lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True), first, bank, 0, 6, 100)
        loader_cls = lambda ps: ia.Adam(ps, lr=1e-2)
    else:
        saver = _checkpoint_run(lambda ps: ia.Adam(ps, lr=1e-2), first, bank, 0, 6, 3)
        loader_cls = lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True)
    second = [p.detach().clone().requires_grad_() for p in first]
    loader = loader_cls(second)
    loader.load_state_dict(copy.deepcopy(saver.state_dict()))
    for t in range(6, 10):
        set_grads(second, bank.grads(t), clone=True)
        loader.step()
    assert_same_state(loader, ref_opt, second, reference)
    if direction == "torch_to_ours":
        geometry = loader.end_epoch()  # θ_end = θ at load; s_{k−1} absent: a first epoch
        assert not geometry.has_previous and loader.state[second[0]]["prev_epoch_step"].dtype == torch.bfloat16


def test_bad_epoch_buffer_arguments():
    p = make_params((4,))
    with pytest.raises(ValueError, match="Invalid epoch_buffers value: 'bf16'"):
        ia.Adam(p, epoch_buffers="bf16")
    with pytest.raises(ValueError, match="Invalid distance_from_init value"):
        ia.Adam(p, distance_from_init="yes")
    # The op refuses a previous step of another dtype than the parameter's or bf16, untouched.
    params, grads = make_params((9,)), [torch.ones(9)]
    exp_avg, exp_avg_sq, steps = [torch.zeros(9)], [torch.zeros(9)], [torch.zeros(())]
    before = params[0].detach().clone()
    with pytest.raises(RuntimeError, match=r"prev_epoch_steps\[0\] has dtype Half but its parameter has dtype Float"):
        ia.functional.adam(params, grads, exp_avg, exp_avg_sq, [], steps,
                           prev_epoch_steps=[torch.zeros(9, dtype=torch.float16)],
                           stats=torch.zeros(1, len(STAT_NAMES), dtype=torch.float64), lr=1e-2, beta1=0.9,
                           beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False)
    assert torch.equal(params[0], before) and steps[0].item() == 0


def test_epoch_ops_opcheck_with_compact_buffers():
    theta = [torch.randn(33), torch.randn(5, 3)]
    start = [t + 0.01 for t in theta]
    prev = [torch.zeros_like(t, dtype=torch.bfloat16) for t in theta]
    out = torch.empty(2, len(EPOCH_COLUMNS) + 1, dtype=torch.float64)
    torch.library.opcheck(_ops.epoch_geometry, (theta, start, prev, [], True, out),
                          test_utils=("test_schema", "test_faketensor"))
