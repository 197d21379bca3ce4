"""end_epoch() geometry against an independent float64 computation over several epochs.

The test keeps its own float64 copies of θ at every epoch boundary and derives s_k, ⟨s_k, s_{k−1}⟩,
‖s_{k−1}‖² and ‖θ − θ_0‖² from them. The optimizer computes the same in float64 but keeps
s_{k−1} rounded to the parameter's dtype between epochs (fp32: 2^-24 relative per element), so the
comparison is to 1e-6: sums of squares relative to the value, dot products relative to Σ|terms|.
"""

from __future__ import annotations

import math

import pytest
import torch

import instrumented_adam as ia
from instrumented_adam import EPOCH_COLUMNS

from conftest import GradBank, make_params, set_grads

REL = 1e-6


def f64(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy (t.double() would alias an fp64 parameter)."""
    return t.detach().to(torch.float64, copy=True)


def test_geometry_over_epochs_with_params_missing_grads():
    """Four epochs; param 1 has grads only in epochs 1 and 3, param 2 never, param 3 from epoch 2 on
    in a second group."""
    sizes = (7, 33, 5, 1000)
    params = make_params(sizes)
    opt = ia.Adam([dict(params=params[:3]), dict(params=params[3:], lr=3e-3, weight_decay=0.1)], lr=1e-2,
                  epoch_buffers="exact")  # the exact figures; compact: tests/test_epoch_buffers.py
    bank = GradBank(sizes)
    has_grad = {  # epoch -> which params get a gradient
        0: {0},
        1: {0, 1},
        2: {0, 3},
        3: {0, 1, 3},
    }
    theta0 = [f64(p) for p in params]  # θ_0: where each parameter starts
    boundaries = [[f64(p) for p in params]]  # θ_end(−1) = θ_0
    step = 0
    for epoch in range(4):
        for _ in range(3):
            grads = bank.grads(step)
            for i, p in enumerate(params):
                p.grad = grads[i] if i in has_grad[epoch] else None
            opt.step()
            step += 1
        geometry = opt.end_epoch()
        assert geometry.epoch == epoch and geometry.has_previous == (epoch > 0)
        assert geometry.values.shape == (len(sizes), len(EPOCH_COLUMNS))
        boundaries.append([f64(p) for p in params])
        for i in range(len(sizes)):
            s_k = boundaries[-1][i] - boundaries[-2][i]
            s_prev = boundaries[-2][i] - boundaries[-3][i] if epoch > 0 else torch.zeros_like(s_k)
            dist = boundaries[-1][i] - theta0[i]
            expected = {
                "step_sumsq": (float((s_k * s_k).sum()),) * 2,
                "step_dot_prev": (float((s_k * s_prev).sum()), float((s_k * s_prev).abs().sum())),
                "prev_step_sumsq": (float((s_prev * s_prev).sum()),) * 2,
                "distance_sumsq": (float((dist * dist).sum()),) * 2,
            }
            for j, column in enumerate(EPOCH_COLUMNS):
                value, scale = expected[column]
                got = geometry.values[i, j].item()
                assert abs(got - value) <= REL * abs(scale), f"epoch {epoch} param {i} {column}: {got} vs {value}"
        # A parameter that never stepped has an all-zero row; one without grads this epoch a zero step.
        assert torch.all(geometry.values[2] == 0)
        if 1 not in has_grad[epoch]:
            assert geometry.values[1, 0] == 0

        # Derived figures, per tensor and overall, from the same float64 copies.
        derived = geometry.derived("tensor")
        overall = geometry.derived("overall")
        s_all = [boundaries[-1][i] - boundaries[-2][i] for i in range(len(sizes))]
        step_norm = math.sqrt(sum(float((s * s).sum()) for s in s_all))
        assert overall["step_norm"].item() == pytest.approx(step_norm, rel=REL)
        dist_all = math.sqrt(sum(float(((boundaries[-1][i] - theta0[i]) ** 2).sum()) for i in range(len(sizes))))
        assert overall["distance_from_init"].item() == pytest.approx(dist_all, rel=REL)
        if epoch == 0:
            assert torch.isnan(overall["cos_prev"]).all() and torch.isnan(derived["cos_prev"]).all()
        else:
            p_all = [boundaries[-2][i] - boundaries[-3][i] for i in range(len(sizes))]
            dot = sum(float((s * q).sum()) for s, q in zip(s_all, p_all))
            prev_norm = math.sqrt(sum(float((q * q).sum()) for q in p_all))
            assert overall["cos_prev"].item() == pytest.approx(dot / (step_norm * prev_norm), rel=REL, abs=1e-9)
            s0, q0 = s_all[0], p_all[0]
            assert derived["cos_prev"][0].item() == pytest.approx(float((s0 * q0).sum() / (s0.norm() * q0.norm())),
                                                                  rel=REL, abs=1e-9)
        group = geometry.derived("group")
        g0 = math.sqrt(sum(float((s * s).sum()) for s in s_all[:3]))
        assert group["step_norm"][0].item() == pytest.approx(g0, rel=REL)
    assert opt.epochs_done == 4


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_geometry_other_dtypes(dtype):
    """fp64 exact to 1e-12; bf16: s_{k−1} is stored in bf16, so ⟨s_k, s_{k−1}⟩ and ‖s_{k−1}‖² are
    those of the stored (rounded) step, to 1e-6; ‖s_k‖² and the distance are exact in float64."""
    sizes = (9, 40)
    params = make_params(sizes, dtype)
    opt = ia.AdamW(params, lr=1e-2, epoch_buffers="exact")
    bank = GradBank(sizes, dtype)
    theta0 = [f64(p) for p in params]
    start = [f64(p) for p in params]
    prev_stored = None
    rel = 1e-12 if dtype == torch.float64 else REL
    for epoch in range(3):
        for t in range(2):
            set_grads(params, bank.grads(2 * epoch + t))
            opt.step()
        geometry = opt.end_epoch()
        for i, p in enumerate(params):
            s = p.double() - start[i]
            q = prev_stored[i] if prev_stored is not None else torch.zeros_like(s)
            d = p.double() - theta0[i]
            row = geometry.values[i].tolist()
            assert row[0] == pytest.approx(float((s * s).sum()), rel=rel)
            assert abs(row[1] - float((s * q).sum())) <= rel * float((s * q).abs().sum())
            assert row[2] == pytest.approx(float((q * q).sum()), rel=rel)
            assert row[3] == pytest.approx(float((d * d).sum()), rel=rel)
        # What the optimizer keeps as s_k for the next epoch: the step rounded to the dtype.
        prev_stored = [(p.double() - start[i]).to(dtype).double() for i, p in enumerate(params)]
        start = [f64(p) for p in params]


def test_epoch_geometry_disabled():
    p = torch.randn(3)
    opt = ia.Adam([p], epoch_geometry=False)
    p.grad = torch.ones(3)
    opt.step()
    assert "epoch_start_param" not in opt.state[p]
    with pytest.raises(RuntimeError, match="epoch_geometry=False"):
        opt.end_epoch()


def test_end_epoch_before_any_step():
    """An epoch without steps is not an epoch (issue 10: it used to record a zero step and make
    the real first epoch a 'second' one): end_epoch() warns and returns None, and the next epoch
    is the first, measured from θ_0."""
    params = make_params((5, 6))
    opt = ia.Adam(params, lr=1e-2, epoch_buffers="exact")
    with pytest.warns(UserWarning, match="without a step"):
        assert opt.end_epoch() is None
    assert opt.epochs_done == 0
    theta0 = [f64(p) for p in params]
    set_grads(params, GradBank((5, 6)).grads(0))
    opt.step()
    geometry = opt.end_epoch()
    assert geometry.epoch == 0 and not geometry.has_previous
    for i, p in enumerate(params):
        s = p.double() - theta0[i]
        assert geometry.values[i, 0].item() == pytest.approx(float((s * s).sum()), rel=REL)
        assert geometry.values[i, 3].item() == pytest.approx(float((s * s).sum()), rel=REL)


def test_add_param_group_after_an_epoch():
    """A group added after an epoch boundary: statistics and geometry keep one row per parameter."""
    a, b = make_params((5, 8))
    opt = ia.Adam([a], lr=1e-2)
    a.grad = torch.ones(5)
    opt.step()
    opt.end_epoch()
    opt.add_param_group(dict(params=[b], lr=1e-3))
    b.grad = torch.ones(8)
    a.grad = torch.ones(5)
    opt.step()
    stats = opt.last_step_statistics()
    derived = stats.derived("tensor")  # needs ‖s_{k−1}‖² per row: two rows now
    assert derived["cos_update_prev_epoch"].shape == (2,)
    assert not math.isnan(derived["cos_update_prev_epoch"][0].item())
    assert math.isnan(derived["cos_update_prev_epoch"][1].item())  # b has no previous epoch step
    geometry = opt.end_epoch()
    assert geometry.values.shape == (2, len(EPOCH_COLUMNS))
    assert geometry.values[1, 0] > 0


# ---- the CPU epoch ops (csrc/cpu/epoch_cpu.cpp) ------------------------------------------------
from instrumented_adam.core import _ops  # noqa: E402
from instrumented_adam.core.optimizer import _Instrumented  # noqa: E402


def _epoch_inputs(dtype, sizes=(1, 7, 33, 40000, 70001), seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for n in sizes]
    start = [t + 1e-2 * torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype) for t in theta]
    prev = [1e-2 * torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype) for t in theta]
    initial = [t + torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype) for t in theta]
    return theta, start, prev, initial


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("has_prev", [True, False])
def test_epoch_op_matches_torch_path(dtype, has_prev):
    """The one-pass CPU op and the chunked torch path (other devices) give the same geometry and
    leave the same buffers: prev = s rounded to the parameter's dtype, start = θ."""
    theta, start, prev, initial = _epoch_inputs(dtype)
    start_t, prev_t = [t.clone() for t in start], [t.clone() for t in prev]
    out = torch.empty(len(theta), len(EPOCH_COLUMNS) + 1, dtype=torch.float64)
    _ops.epoch_geometry(theta, start, prev, initial, has_prev, out)
    zero = torch.zeros((), dtype=torch.float64)
    for i, t in enumerate(theta):
        state = {"epoch_start_param": start_t[i], "initial_param": initial[i]}
        if has_prev:
            state["prev_epoch_step"] = prev_t[i]
        row, stored_sumsq = _Instrumented._epoch_row_torch(t, state, zero)
        torch.testing.assert_close(out[i, :4], row, rtol=1e-12, atol=1e-300)
        torch.testing.assert_close(out[i, 4], stored_sumsq, rtol=1e-12, atol=1e-300)
        assert torch.equal(start[i], t) and torch.equal(state["epoch_start_param"], t)
        assert torch.equal(prev[i], state["prev_epoch_step"])
    if not has_prev:
        assert (out[:, 1] == 0).all() and (out[:, 2] == 0).all()


def test_sum_of_squares_reproduces_the_epoch_op_bitwise():
    """After a checkpoint load, ‖s_{k-1}‖² is recomputed from the stored buffer: it must equal,
    bit for bit, what end_epoch computed (a resumed run's cosines are compared exactly)."""
    theta, start, prev, initial = _epoch_inputs(torch.float32)
    out = torch.empty(len(theta), len(EPOCH_COLUMNS) + 1, dtype=torch.float64)
    _ops.epoch_geometry(theta, start, prev, initial, True, out)
    again = torch.empty(len(theta), 1, dtype=torch.float64)
    _ops.sum_of_squares(prev, again)
    assert torch.equal(again[:, 0], out[:, 4])


def test_epoch_op_does_not_depend_on_thread_count():
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        theta, start, prev, initial = _epoch_inputs(torch.float32, sizes=(300000, 5))
        out = torch.empty(2, len(EPOCH_COLUMNS) + 1, dtype=torch.float64)
        _ops.epoch_geometry(theta, start, prev, initial, True, out)
        results.append(out)
    torch.set_num_threads(1)
    assert torch.equal(results[0], results[1])


def test_epoch_op_rejects_mismatched_buffers_untouched():
    theta, start, prev, initial = _epoch_inputs(torch.float32, sizes=(10, 12))
    before = [t.clone() for t in start]
    out = torch.empty(2, len(EPOCH_COLUMNS) + 1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="shape"):
        _ops.epoch_geometry(theta, start, [prev[0], prev[0]], initial, True, out)
    assert all(torch.equal(a, b) for a, b in zip(start, before))


def test_epoch_ops_opcheck():
    theta, start, prev, initial = _epoch_inputs(torch.float32, sizes=(5, 17))
    out = torch.empty(2, len(EPOCH_COLUMNS) + 1, dtype=torch.float64)
    torch.library.opcheck(_ops.epoch_geometry, (theta, start, prev, initial, True, out))
    torch.library.opcheck(_ops.sum_of_squares, (prev, torch.empty(2, 1, dtype=torch.float64)))
