"""The recorder on CUDA: same rows as the optimizer reports, and no host synchronisation per step."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import instrumented_adam as ia
from instrumented_adam.telemetry.recorder import STEP_FIGURES, Recorder
from instrumented_adam.telemetry.store import RunStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).cuda()


def test_rows_equal_the_optimizers_figures_on_cuda(tmp_path):
    model = _model()
    opt = ia.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}], lr=1e-3)
    rec = Recorder(opt, tmp_path / "c.sqlite", run_name="c", model=model, flush_every=4)
    expected = []
    for _ in range(2):
        for _ in range(7):
            model(torch.randn(8, 16, device="cuda")).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            expected.append({k: float(v[0]) for k, v in opt.last_step_statistics().derived().items()})
        rec.end_epoch(val_loss=1.0)
    rec.close()
    steps = RunStore(tmp_path / "c.sqlite").steps("c")
    assert steps["step"].tolist() == list(range(1, 15))
    exp = pd.DataFrame(expected)
    for f in STEP_FIGURES:
        np.testing.assert_allclose(steps[f], exp[f], rtol=1e-12, atol=0, err_msg=f)


def test_no_host_synchronisation_in_the_steps(tmp_path):
    """Steps with the recorder attached, flushes included, under CUDA's sync debug mode."""
    model = _model()
    opt = ia.Adam(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    rec = Recorder(opt, tmp_path / "s.sqlite", run_name="s", flush_every=3)
    x = torch.randn(8, 16, device="cuda")
    for _ in range(2):  # warm-up: state, plans and the ring are allocated outside the checked region
        model(x).pow(2).mean().backward()
        opt.step()
    rec.flush()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):  # three ring flushes happen in here: derived and copied out without waiting
            model(x).pow(2).mean().backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rec.end_epoch()
    rec.close()
    steps = RunStore(tmp_path / "s.sqlite").steps("s")
    assert steps["step"].tolist() == list(range(1, 13))
    np.testing.assert_allclose(steps["lr"], 1e-3, rtol=1e-6)


def test_skipped_amp_steps_on_cuda_without_host_synchronisation(tmp_path):
    """GradScaler on CUDA: its skip flag and scale are cloned on the device in the step hook (no
    sync) and read when the block lands; a skipped step is recorded as skipped, NaN figures (its
    non-finite element count is not measured on CUDA: the kernel skips the pass)."""
    model = _model()
    opt = ia.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    rec = Recorder(opt, tmp_path / "a.sqlite", run_name="amp", flush_every=3)
    x = torch.randn(8, 16, device="cuda")

    def one_step(poison: bool) -> None:
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        if poison:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)

    one_step(False)  # warm-up outside the checked region
    scaler.update()
    rec.flush()
    torch.cuda.synchronize()
    for i in range(4):
        torch.cuda.set_sync_debug_mode("error")
        try:
            one_step(i == 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()  # GradScaler's own update (it may read the flag itself)
    rec.end_epoch()
    rec.close()
    with RunStore(tmp_path / "a.sqlite") as store:
        s = store.steps("amp")
        assert s["skipped"].tolist() == [0, 0, 1, 0, 0]
        assert s["grad_scale"].tolist() == [1024.0, 1024.0, 1024.0, 512.0, 512.0]
        assert np.isnan(s["grad_norm"].iloc[2]) and (s["grad_norm"].drop(index=2) > 0).all()
        assert store.epochs("amp")["skipped_steps"].tolist() == [1]
