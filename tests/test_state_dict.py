"""Checkpoints: torch.optim's load into ours, ours into torch's, and ours resume bitwise.

Every checkpoint goes through torch.save / torch.load on a BytesIO, as a real one would.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import instrumented_adam as ia

from conftest import ODD_SIZES, OPTIMIZERS, GradBank, assert_same_state, make_params, set_grads

SIZES = ODD_SIZES[:8] + (1000,)


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def train(opt, params, bank, steps, start=0):
    for t in range(start, start + steps):
        set_grads(params, bank.grads(t))
        opt.step()


KWARGS = {
    "Adam": dict(lr=1e-2, weight_decay=0.01, amsgrad=True),
    "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "Adamax": dict(lr=2e-3, weight_decay=0.01),
}


def torch_kwargs(name, source_fused):
    """torch.optim's own optimizer: fused where torch has one (Adamax has only the for-loop)."""
    if name == "Adamax":
        return dict(foreach=False)
    return dict(fused=True) if source_fused else dict(foreach=False)


def force_torch_path(opt, name):
    """torch's load_state_dict restores the saved groups' `fused`/`foreach` flags too: put the
    comparison optimizer back on the path ours follows."""
    for group in opt.param_groups:
        group["foreach"] = False
        group["fused"] = name != "Adamax"


@pytest.mark.parametrize("name, source_fused", [
    ("Adam", False), ("Adam", True), ("AdamW", False), ("AdamW", True), ("Adamax", False),  # no fused Adamax
], ids=["Adam-torch-forloop", "Adam-torch-fused", "AdamW-torch-forloop", "AdamW-torch-fused", "Adamax-torch-forloop"])
def test_torch_checkpoint_loads_into_ours(name, source_fused):
    """A torch.optim checkpoint (for-loop or fused) continues in ours exactly as in torch.

    The comparison continues torch's own optimizer from the same checkpoint: fused for Adam/AdamW
    (ours is bitwise torch fused), the for-loop path for Adamax (ours follows it bitwise).
    """
    ours_cls, torch_cls = OPTIMIZERS[name]
    kwargs = KWARGS[name]
    bank = GradBank(SIZES)
    params = make_params(SIZES)
    source = torch_cls(params, **kwargs, **torch_kwargs(name, source_fused))
    train(source, params, bank, 20)
    checkpoint = roundtrip({"params": [p.detach() for p in params], "optim": source.state_dict()})

    ours_p = [p.clone() for p in checkpoint["params"]]
    theirs_p = [p.clone() for p in checkpoint["params"]]
    ours = ours_cls(ours_p, **kwargs)
    theirs = torch_cls(theirs_p, **kwargs, **torch_kwargs(name, True))
    # Each load gets its own copy: torch's load_state_dict keeps the given tensors when their dtype
    # and device already fit, so two optimizers loaded from one dict would share their state.
    ours.load_state_dict(copy.deepcopy(checkpoint["optim"]))
    theirs.load_state_dict(copy.deepcopy(checkpoint["optim"]))
    force_torch_path(theirs, name)
    for t in range(20, 50):
        grads = bank.grads(t)
        set_grads(ours_p, grads)
        set_grads(theirs_p, grads)
        ours.step()
        theirs.step()
    assert_same_state(ours, theirs, ours_p, theirs_p, msg=name)
    # Telemetry starts where our instrumentation started: the checkpoint.
    assert ours.steps_done == 30
    stats = ours.last_step_statistics()
    assert torch.all(stats["grad_sumsq"] > 0)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax"])
def test_our_checkpoint_loads_into_torch(name):
    """Ours → torch.optim: torch ignores our extra entries and continues as if it had trained."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    kwargs = KWARGS[name]
    bank = GradBank(SIZES)
    params = make_params(SIZES)
    ours = ours_cls(params, **kwargs)
    train(ours, params, bank, 10)
    ours.end_epoch()  # so that the epoch buffers are in the checkpoint too
    train(ours, params, bank, 10, start=10)
    checkpoint = roundtrip({"params": [p.detach() for p in params], "optim": ours.state_dict()})

    theirs_p = [p.clone() for p in checkpoint["params"]]
    theirs = torch_cls(theirs_p, **kwargs, **torch_kwargs(name, True))
    theirs.load_state_dict(checkpoint["optim"])
    force_torch_path(theirs, name)
    for t in range(20, 40):
        grads = bank.grads(t)
        set_grads(params, grads)
        set_grads(theirs_p, grads)
        ours.step()
        theirs.step()
    assert_same_state(ours, theirs, params, theirs_p, msg=name)


def run_with_epochs(opt, params, bank, start, stop, epoch_every, record):
    """Steps [start, stop), closing an epoch every `epoch_every` steps; records stats and geometry."""
    for t in range(start, stop):
        set_grads(params, bank.grads(t))
        opt.step()
        stats = opt.last_step_statistics()
        record.append(("step", t, stats.values.clone(), {k: v.clone() for k, v in stats.derived("tensor").items()}))
        if t % epoch_every == epoch_every - 1:
            geometry = opt.end_epoch()
            record.append(("epoch", t, geometry.values.clone(), geometry.derived("overall")))


def assert_same_record(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[:2] == y[:2]
        # Bitwise, NaN where NaN (the compact default does not measure the distance from θ_0).
        torch.testing.assert_close(x[2], y[2], rtol=0, atol=0, equal_nan=True, msg=f"{x[0]} at step {x[1]}")
        for key in x[3]:
            torch.testing.assert_close(x[3][key], y[3][key], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("epoch_buffers", ["compact", "exact"])
@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax"])
def test_resume_mid_run_is_bitwise(name, epoch_buffers):
    """Save in the middle of an epoch (after two epoch boundaries), load into a fresh optimizer and
    fresh parameters: θ, state, per-step statistics (incl. update_dot_prev_epoch and its cosine)
    and the epoch geometry continue bitwise as in the uninterrupted run, in either buffer mode."""
    ours_cls = OPTIMIZERS[name][0]
    kwargs = {**KWARGS[name], "epoch_buffers": epoch_buffers}
    bank = GradBank(SIZES)
    groups = lambda ps: [dict(params=ps[:4]), dict(params=ps[4:], lr=3e-3)]

    params = make_params(SIZES)
    straight = ours_cls(groups(params), **kwargs)
    record_straight = []
    run_with_epochs(straight, params, bank, 0, 40, 12, record_straight)

    first = make_params(SIZES)
    opt = ours_cls(groups(first), **kwargs)
    record = []
    run_with_epochs(opt, first, bank, 0, 30, 12, record)  # stops 6 steps into the third epoch
    checkpoint = roundtrip({"params": [p.detach() for p in first], "optim": opt.state_dict()})
    assert checkpoint["optim"]["instrumentation"] == {"steps_done": 30, "epochs_done": 2, "steps_at_epoch_end": 24}

    resumed_p = [p.clone() for p in checkpoint["params"]]
    resumed = ours_cls(groups(resumed_p), **kwargs)
    resumed.load_state_dict(checkpoint["optim"])
    assert (resumed.steps_done, resumed.epochs_done) == (30, 2)
    run_with_epochs(resumed, resumed_p, bank, 30, 40, 12, record)

    assert_same_record(record_straight, record)
    assert_same_state(straight, resumed, params, resumed_p, msg=name)
    for p, q in zip(params, resumed_p):
        for key in ("epoch_start_param", "prev_epoch_step", "initial_param"):
            assert (key in straight.state[p]) == (key in resumed.state[q]), key
            if key in straight.state[p]:  # θ_0 is kept by the exact mode only (by default)
                assert torch.equal(straight.state[p][key], resumed.state[q][key]), key


def test_deepcopy_continues_identically():
    """copy.deepcopy / pickle keep the instrumentation settings and counters (torch.optim's
    __getstate__ keeps only defaults, state and param_groups)."""
    params = make_params(SIZES)
    opt = ia.Adam(params, lr=1e-2, statistics=True)
    bank = GradBank(SIZES)
    train(opt, params, bank, 5)
    opt.end_epoch()
    train(opt, params, bank, 2, start=5)
    params2, opt2 = copy.deepcopy((params, opt))
    assert (opt2.steps_done, opt2.epochs_done, opt2.statistics, opt2.epoch_geometry) == (7, 1, True, True)
    for t in range(7, 12):
        grads = bank.grads(t)
        set_grads(params, grads)
        set_grads(params2, grads)
        opt.step()
        opt2.step()
        assert torch.equal(opt.last_step_statistics().values, opt2.last_step_statistics().values)
        torch.testing.assert_close(opt.last_step_statistics().derived(), opt2.last_step_statistics().derived(),
                                   rtol=0, atol=0, equal_nan=True)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))


def test_legacy_checkpoint_with_python_float_steps():
    """Old torch.optim checkpoints kept `step` as a Python number; it becomes a float32 tensor."""
    params = make_params((7, 9))
    source = torch.optim.Adam(params, lr=1e-2)
    train(source, params, GradBank((7, 9)), 3)
    state_dict = source.state_dict()
    for entry in state_dict["state"].values():
        entry["step"] = float(entry["step"])
    ours_p = [p.clone() for p in params]
    theirs_p = [p.clone() for p in params]
    ours = ia.Adam(ours_p, lr=1e-2)
    theirs = torch.optim.Adam(theirs_p, lr=1e-2, fused=True)
    ours.load_state_dict(copy.deepcopy(state_dict))
    theirs.load_state_dict(copy.deepcopy(state_dict))
    force_torch_path(theirs, "Adam")
    bank = GradBank((7, 9))
    for t in range(3, 8):
        grads = bank.grads(t)
        set_grads(ours_p, grads)
        set_grads(theirs_p, grads)
        ours.step()
        theirs.step()
    assert_same_state(ours, theirs, ours_p, theirs_p)
    assert ours.state[ours_p[0]]["step"].dtype == torch.float32
