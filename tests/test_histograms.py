"""The kernel's step histograms (csrc/histogram.h, core/histogram.py, histogram_every).

Bin counts are checked against an independent computation from outside the package: numpy's
frexp in float64 on the same gradients, on Δθ as stored, and on the effective step size computed
with torch's correctly rounded elementwise ops from the stored moment (the kernel's formula, in
its compute type). Every ISA path (this file again under ATEN_CPU_CAPABILITY=avx2 and default),
fp32/fp64/bf16/fp16 parameters, sizes that are not multiples of any vector width, several work
items, two threads. A histogram step never changes the update.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import instrumented_adam as ia
from instrumented_adam import NUM_STATS, _C, functional
from instrumented_adam.core import histogram as H

from conftest import run_isa_subprocess

SIZES = (1, 7, 17, 33, 1000, 65549)  # 65549: three 32768-element work items, a ragged tail
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
OPTIMIZERS = {
    "adam": lambda ps, **kw: ia.Adam(ps, lr=1e-3, weight_decay=1e-2, **kw),
    "adamw-amsgrad": lambda ps, **kw: ia.AdamW(ps, lr=3e-3, amsgrad=True, **kw),
    "adamax": lambda ps, **kw: ia.Adamax(ps, lr=2e-3, **kw),
}


def frexp_counts(values: np.ndarray) -> np.ndarray:
    """The documented bins, from numpy's frexp in float64 (independent of the kernel's bit tricks)."""
    x = np.abs(np.asarray(values, dtype=np.float64).ravel())
    counts = np.zeros(258, dtype=np.int64)
    finite = np.isfinite(x)
    counts[257] = (~finite).sum()
    x = x[finite]
    counts[0] = (x == 0).sum()
    x = x[x != 0]
    _, e = np.frexp(x)  # x = m * 2**e, 0.5 <= m < 1, so floor(log2 x) = e - 1
    floor_log2 = e.astype(np.int64) - 1
    counts[1] = (floor_log2 < -126).sum()
    counts[256] = (floor_log2 > 127).sum()
    inside = floor_log2[(floor_log2 >= -126) & (floor_log2 <= 127)]
    np.add.at(counts, inside + 128, 1)
    return counts


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def expected_histograms(opt, p: torch.Tensor, before: torch.Tensor, grad: torch.Tensor, state: dict | None = None
                        ) -> np.ndarray:
    """[3, 258] counts of |g|, |Δθ| and the effective step size, computed from the state (on the
    host; `state` overrides opt.state[p], e.g. a CUDA parameter's state copied to the CPU)."""
    ct = compute_dtype(p.dtype)
    group = opt.param_groups[0]
    state = opt.state[p] if state is None else state
    t = float(state["step"])
    beta1, beta2 = group["betas"]
    step_size = torch.tensor(group["lr"] / (1 - beta1**t), dtype=ct)  # rounded once, as the kernel
    if isinstance(opt, ia.Adamax):
        denom = state["exp_inf"].to(ct)
    else:
        moment = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        v = moment.to(ct)
        bc2_sqrt = torch.full_like(v, math.sqrt(1 - beta2**t))
        denom = torch.sqrt(v) / bc2_sqrt + torch.full_like(v, group["eps"])
    eff = torch.full_like(denom, float(step_size)) / denom
    delta = p.detach().to(ct) - before.to(ct)
    return np.stack([frexp_counts(grad.to(ct).numpy()), frexp_counts(delta.numpy()), frexp_counts(eff.numpy())])


def make_grad(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Gradients over many decades, with zeros, a subnormal, ±inf and NaN planted."""
    scale = torch.exp2(torch.randint(-30, 4, (n,), generator=gen).double())
    g = (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if n >= 7:
        g[0] = 0.0
        g[1] = -0.0
        g[2] = torch.finfo(dtype).tiny / 4 if dtype in (torch.float32, torch.float64) else 0.0
        g[3] = 1e-40 if dtype == torch.float64 else 1.0  # below 2^-126: the underflow bin for fp64
    return g


def test_layout_is_the_extension_s():
    """core/histogram.py (torch-free) and csrc/histogram.h agree on names, order and bins."""
    assert H.HISTOGRAM_TABLE == tuple(tuple(x) for x in _C.HISTOGRAM_TABLE)
    assert H.HISTOGRAM_BINS == _C.HISTOGRAM_BINS == 258
    assert H.MIN_EXPONENT == _C.HISTOGRAM_MIN_EXPONENT
    assert H.bin_labels()[2] == "2^-126" and H.bin_labels()[255] == "2^127"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_counts_match_frexp(name, dtype, two_threads):
    gen = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in SIZES]
    opt = OPTIMIZERS[name](params, histogram_every=1)
    for step in range(3):
        grads = [make_grad(p.numel(), dtype, gen) for p in params]
        if step == 2:
            grads[-1][5] = float("inf")
            grads[-1][6] = float("nan")
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = [p.detach().clone() for p in params]
        opt.step()
        hist = opt.last_step_histograms()
        assert hist is not None and hist.step == step + 1
        for i, (p, b, g) in enumerate(zip(params, before, grads)):
            expected = expected_histograms(opt, p, b, g)
            np.testing.assert_array_equal(hist.counts[i].numpy(), expected, err_msg=f"tensor {i} step {step + 1}")
            assert (hist.counts[i].sum(-1) == p.numel()).all()
    assert hist.counts[-1, 0, H.NONFINITE_BIN] == 2  # the planted inf and NaN gradients


def window_shaped_grads(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Gradients shaped against the AVX2/AVX-512 fp32 counter (csrc/histogram.h, WindowHistograms):
    a 16-binade window in registers, placed on the first normal values, re-centred when values
    leave it, everything outside counted lane by lane."""
    i = torch.arange(n, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    one_bin = 1.0 + torch.rand(n, generator=gen, dtype=torch.float64) * 0.99  # all in [1, 2): no lane outside
    late = torch.zeros(n, dtype=torch.float64)
    late[n - 3000:] = torch.randn(3000, generator=gen, dtype=torch.float64)  # zeros, then the window's first values
    sparse = torch.randn(n, generator=gen, dtype=torch.float64) * (torch.rand(n, generator=gen) < 0.03)
    return {
        "one_bin": sign * one_bin,
        # the exponent climbs 60 binades along the tensor (and within each work item): the window must follow
        "drift": sign * torch.exp2(-40 + 60 * i / n) * one_bin,
        # 200 binades, log-uniform: wider than any window, most lanes counted one by one
        "wide": sign * torch.exp2(torch.rand(n, generator=gen, dtype=torch.float64) * 200 - 120),
        "late_first_value": late,
        "mostly_zeros": sparse,
        "two_modes": torch.where(torch.rand(n, generator=gen) < 0.5, 1e-9, 1e3).double() * one_bin,
    }


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: str(d).split(".")[-1])
def test_counts_match_frexp_window_shapes(dtype, two_threads):
    gen = torch.Generator().manual_seed(5)
    n = 65549  # three work items, a ragged tail
    shapes = window_shaped_grads(n, gen)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for _ in shapes]
    opt = ia.Adam(params, lr=1e-3, histogram_every=1)
    for step in range(2):
        grads = [g.to(dtype) for g in shapes.values()]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = [p.detach().clone() for p in params]
        opt.step()
        hist = opt.last_step_histograms()
        for i, (name, p, b, g) in enumerate(zip(shapes, params, before, grads)):
            np.testing.assert_array_equal(hist.counts[i].numpy(), expected_histograms(opt, p, b, g),
                                          err_msg=f"{name} step {step + 1}")
    # the shapes are what they claim: one binade, and 60 of them
    assert (hist.counts[0, 0] > 0).sum() == 1
    assert (hist.counts[1, 0] > 0).sum() >= 55


def test_median_effective_step_size_within_one_bin():
    """The histogram's median (and percentiles) of the effective step size vs the exact ones."""
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(50_001, generator=gen))
    opt = ia.Adam([p], lr=1e-3, histogram_every=1)
    for _ in range(5):
        p.grad = torch.randn(50_001, generator=gen) * torch.exp2(torch.randint(-20, 2, (50_001,), generator=gen))
        opt.step()
    counts = opt.last_step_histograms().kind("eff_lr")[0].numpy()
    state = opt.state[p]
    t = float(state["step"])
    eff = (1e-3 / (1 - 0.9**t)) / (state["exp_avg_sq"].double().sqrt() / math.sqrt(1 - 0.999**t) + 1e-8)
    exact = eff.numpy()
    for q in (0.5, 0.0668, 0.1587, 0.8413, 0.9332):
        estimate = H.quantiles(counts, [q])[0]
        true = np.quantile(exact, q)
        assert abs(math.floor(math.log2(estimate)) - math.floor(math.log2(true))) <= 1, (q, estimate, true)
    estimate = H.median(counts)
    assert abs(math.log2(estimate) - math.log2(np.median(exact))) < 1.0
    assert eff.mean() > 10 * np.median(exact)  # what the mean reports instead: near-zero v dominates


def test_quantiles_edge_bins():
    counts = np.zeros(258, dtype=np.int64)
    assert math.isnan(H.median(counts))
    counts[0] = 3
    assert H.median(counts) == 0.0
    counts[257] = 10
    assert H.median(counts) == math.inf
    np.testing.assert_array_equal(H.counts_of(np.array([0.0, 1.0, 1.5, np.inf, np.nan, 1e-300, 1e300])),
                                  frexp_counts(np.array([0.0, 1.0, 1.5, np.inf, np.nan, 1e-300, 1e300])))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: str(d).split(".")[-1])
def test_histograms_never_change_the_update(name, dtype, two_threads):
    """Parameters, state and statistics bitwise equal with histograms every step, every 2nd, off."""
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(n, generator=gen).to(dtype) for n in (33, 65549)]
    runs = []
    for every in (0, 1, 2):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        runs.append((params, OPTIMIZERS[name](params, histogram_every=every), []))
    for _ in range(4):
        grads = [torch.randn(t.shape, generator=gen).to(dtype) for t in init]
        for params, opt, stats in runs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            stats.append(opt.last_step_statistics().values)
    ref_params, ref_opt, ref_stats = runs[0]
    for params, opt, stats in runs[1:]:
        for p, q in zip(ref_params, params):
            assert torch.equal(p, q)
            for key, value in ref_opt.state[p].items():
                assert torch.equal(value, opt.state[q][key]), key
        for a, b in zip(ref_stats, stats):
            assert torch.equal(a, b)


def test_every_n_steps_and_none_between():
    p = torch.nn.Parameter(torch.randn(10))
    opt = ia.Adam([p], histogram_every=3)
    seen = []
    for _ in range(7):
        p.grad = torch.randn(10)
        opt.step()
        h = opt.last_step_histograms()
        seen.append(None if h is None else h.step)
    assert seen == [None, None, 3, None, None, 6, None]
    with pytest.raises(RuntimeError, match="histogram_every=0"):
        ia.Adam([p]).last_step_histograms()


@pytest.mark.parametrize("bad", (-1, 1.5, True, "2", None))
def test_bad_histogram_every(bad):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="Invalid histogram_every value"):
        ia.Adam([p], histogram_every=bad)


def test_histogram_every_needs_statistics():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="needs statistics=True"):
        ia.AdamW([p], statistics=False, histogram_every=10)


def _op_args(n: int = 9):
    p, g = torch.randn(n), torch.randn(n)
    return [p], [g], [torch.zeros(n)], [torch.zeros(n)], [], [], [torch.zeros(())]


OP_KW = dict(algorithm=0, lr=1e-3, lr_tensor=None, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
             amsgrad=False, maximize=False, grad_scale=None, found_inf=None, stat_rows=[])


@pytest.mark.parametrize("histograms, stats, message", [
    (torch.zeros(1, 3, 257, dtype=torch.int64), True, "histograms must be a contiguous int64"),
    (torch.zeros(1, 3, 258, dtype=torch.float64), True, "histograms must be a contiguous int64"),
    (torch.zeros(2, 3, 258, dtype=torch.int64), True, "histograms must be a contiguous int64"),
    (torch.zeros(1, 3, 258, dtype=torch.int64), False, "histograms need stats"),
])
def test_op_rejects_bad_histogram_buffers_before_mutating(histograms, stats, message):
    args = _op_args()
    before = [t.clone() for t in args[0] + args[2] + args[6]]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.instrumented_adam.adam_step(
            *args, stats=torch.zeros(1, NUM_STATS, dtype=torch.float64) if stats else None, histograms=histograms,
            **OP_KW)
    for a, b in zip(before, args[0] + args[2] + args[6]):
        assert torch.equal(a, b)


def test_functional_rows_and_skipped_step():
    """stat_rows place each tensor's histograms; rows not in the call and found_inf steps are zero."""
    params = [torch.randn(5), torch.randn(8)]
    grads = [torch.randn(5), torch.randn(8)]
    state = dict(exp_avgs=[torch.zeros(5), torch.zeros(8)], exp_avg_sqs=[torch.zeros(5), torch.zeros(8)])
    steps = [torch.zeros(()), torch.zeros(())]
    stats = torch.zeros(3, NUM_STATS, dtype=torch.float64)
    hist = torch.full((3, 3, 258), 7, dtype=torch.int64)
    functional.adam(params, grads, state["exp_avgs"], state["exp_avg_sqs"], [], steps, lr=1e-3, beta1=0.9,
                    beta2=0.999, eps=1e-8, weight_decay=0.0, stats=stats, stat_rows=[2, 0], histograms=hist)
    assert hist[1].sum() == 0
    np.testing.assert_array_equal(hist[2, 0].numpy(), frexp_counts(grads[0].numpy()))
    np.testing.assert_array_equal(hist[0, 0].numpy(), frexp_counts(grads[1].numpy()))
    functional.adam(params, grads, state["exp_avgs"], state["exp_avg_sqs"], [], steps, lr=1e-3, beta1=0.9,
                    beta2=0.999, eps=1e-8, weight_decay=0.0, stats=stats, stat_rows=[2, 0], histograms=hist,
                    found_inf=torch.ones(()), grad_scale=torch.ones(()))
    assert hist.sum() == 0


def test_differentiable_group_histograms_from_the_reference():
    p = torch.randn(40, requires_grad=True).clone()  # a non-leaf, as meta-learning steps one
    opt = ia.Adam([p], lr=1e-2, differentiable=True, histogram_every=1)
    g = torch.randn(40)
    p.grad = g.clone()
    opt.step()
    h = opt.last_step_histograms()
    np.testing.assert_array_equal(h.kind("grad_abs")[0].numpy(), frexp_counts(g.numpy()))
    assert (h.counts[0].sum(-1) == 40).all()


@pytest.mark.isa_subprocess
@pytest.mark.parametrize("env, expected", [("avx2", "AVX2"), ("default", "DEFAULT")])
def test_isa_subprocess(env, expected):
    """This file's kernel tests again with the kernels forced to another instruction set."""
    run_isa_subprocess("test_histograms.py", env, expected, select="counts_match or never_change")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_counts_match_frexp(name, dtype):
    gen = torch.Generator().manual_seed(2)
    host = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    params = [torch.nn.Parameter(t.cuda()) for t in host]
    opt = OPTIMIZERS[name](params, histogram_every=2)
    for step in range(4):
        grads = [make_grad(t.numel(), dtype, gen) for t in host]
        for p, g in zip(params, grads):
            p.grad = g.cuda()
        before = [p.detach().cpu() for p in params]
        opt.step()
        hist = opt.last_step_histograms()
        if step % 2 == 0:
            assert hist is None
            continue
        counts = hist.counts.cpu()
        for i, (p, b, g) in enumerate(zip(params, before, grads)):
            host_state = {k: v.cpu() for k, v in opt.state[p].items()}
            expected = expected_histograms(opt, p.detach().cpu(), b, g, host_state)
            # |g| and |Δθ| exactly. The effective step size: torch's CUDA arithmetic (float bias
            # corrections) and, for bf16/fp16, the unrounded moment in registers put a few elements
            # next to a bin edge into the neighbour bin (each moved element counts twice here).
            np.testing.assert_array_equal(counts[i, :2].numpy(), expected[:2])
            assert counts[i, 2].sum() == p.numel()
            assert np.abs(counts[i, 2].numpy() - expected[2]).sum() <= 2 + 2 * p.numel() // 100


def test_recorder_store_and_exports(tmp_path):
    """Recorded histograms reach the store (per tensor, at the optimizer's steps), CSV and TensorBoard."""
    from instrumented_adam.telemetry.export import to_csv, to_tensorboard
    from instrumented_adam.telemetry.recorder import Recorder

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    opt = ia.Adam(model.parameters(), lr=1e-2, histogram_every=4)
    expected = {}
    with Recorder(opt, tmp_path / "s.sqlite", "h", model=model, flush_every=3) as rec:
        for epoch in range(2):
            for _ in range(5):
                opt.zero_grad()
                model(torch.randn(8, 6)).pow(2).mean().backward()
                opt.step()
                h = opt.last_step_histograms()
                if h is not None:
                    expected[h.step] = h.counts.clone()
            rec.end_epoch(train_loss=1.0)
    store = ia.telemetry.store.RunStore(tmp_path / "s.sqlite", readonly=True)
    df = store.histograms("h")
    assert sorted(set(df["step"])) == [4, 8] == sorted(expected)
    assert set(df["layer"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for row in df.itertuples():
        kind = H.HISTOGRAM_NAMES.index(row.kind)
        np.testing.assert_array_equal(row.counts, expected[row.step][row.layer_index, kind].numpy())
    assert set(df[df["step"] == 8]["epoch"]) == {1}
    csv = to_csv(store, tmp_path / "csv")
    wide = __import__("pandas").read_csv(csv["histograms"])
    assert len(wide) == len(df) and wide[[f"bin_{b}" for b in range(258)]].to_numpy().sum() == sum(
        int(c.sum()) for c in df["counts"])
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = to_tensorboard(store, tmp_path / "tb")
    events = EventAccumulator(str(run_dir), size_guidance={"histograms": 0}).Reload()
    assert "histograms/eff_lr_log2" in events.Tags()["histograms"]
    assert [e.step for e in events.Histograms("histograms/0.weight/grad_abs_log2")] == [4, 8]
    store.close()


def test_report_quantiles_come_from_the_histograms():
    """The report's effective-step-size median per epoch is the histogram's, at the epoch's last
    histogram step, summed over tensors."""
    import pandas as pd

    from instrumented_adam.analysis import interactive
    from instrumented_adam.analysis.relations import RunData

    a, b = np.zeros(258, dtype=np.int64), np.zeros(258, dtype=np.int64)
    a[128 - 10] = 30  # 2^-10 <= x < 2^-9
    b[128 - 3] = 10
    rows = [(1, 5, 0, 0, "w", "eff_lr", a), (1, 5, 0, 1, "b", "eff_lr", b), (1, 9, 1, 0, "w", "eff_lr", b),
            (1, 9, 1, 1, "b", "eff_lr", b)]
    h = pd.DataFrame(rows, columns=["run_id", "step", "epoch", "layer_index", "layer", "kind", "counts"])
    run = RunData(1, "r", {}, pd.DataFrame({"epoch": [0, 1]}), pd.DataFrame(), pd.DataFrame(), {}, h)
    q = interactive.epoch_quantiles(run, "eff_lr", (0.5,))
    assert list(q["epoch"]) == [0, 1]
    assert 2.0**-10 <= q.iloc[0, 1] < 2.0**-9  # 30 of 40 elements in the lower bin
    assert 2.0**-3 <= q.iloc[1, 1] < 2.0**-2
    figure = interactive.figure_distributions([run])
    assert figure["data"] and figure["layout"]["yaxis"]["type"] == "log"
    assert interactive.figure_histograms(run)["data"]
