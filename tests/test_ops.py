"""The ops of csrc/ops.cpp under torch.library.opcheck, and their fake kernels' checks.

opcheck runs each op eagerly, under FakeTensorMode (our fake kernels), and through the
dispatcher's schema checks (which tensors it mutates, aliasing, autograd registration). The fake
kernels must reject what the real kernels reject (wrong list lengths, shapes, dtypes, a statistics
buffer of the wrong shape) so that a traced call fails as an eager one does.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from instrumented_adam.core import _ops
from instrumented_adam.core._ops import EPOCH_GEOMETRY_COLUMNS, NUM_STATS, adam_step, epoch_geometry, sum_of_squares


def step_args(algorithm=0, amsgrad=False, stats=True, prev=False, dtypes=(torch.float32, torch.bfloat16)):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).to(dt) for n, dt in zip((7, 40), dtypes)]
    args = (
        params,
        [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params],
        [torch.zeros_like(p) for p in params],
        [torch.rand(p.shape, generator=gen).to(p.dtype) * 0.1 for p in params],
        [torch.rand(p.shape, generator=gen).to(p.dtype) * 0.2 for p in params] if amsgrad else [],
        [torch.randn(p.shape, generator=gen).to(p.dtype) * 0.01 for p in params] if prev else [],
        [torch.full((), 2.0) for _ in params],
    )
    kwargs = dict(algorithm=algorithm, lr=1e-3, lr_tensor=None, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                  amsgrad=amsgrad, maximize=False, grad_scale=None, found_inf=None,
                  stats=torch.zeros(len(params), NUM_STATS, dtype=torch.float64) if stats else None, stat_rows=[])
    return args, kwargs


@pytest.mark.parametrize("algorithm", list(_ops.Algorithm), ids=lambda a: a.name.lower())
@pytest.mark.parametrize("amsgrad,prev", [(False, False), (True, True)], ids=["plain", "amsgrad+prev"])
def test_opcheck_adam_step(algorithm, amsgrad, prev):
    args, kwargs = step_args(int(algorithm), amsgrad=amsgrad, prev=prev)
    torch.library.opcheck(adam_step.default, args, kwargs)


def epoch_args(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    theta = [torch.randn(n, generator=gen).to(dtype) for n in (5, 33)]
    start = [t + 0.1 for t in theta]
    prev = [torch.randn(t.shape, generator=gen).to(dtype) * 0.1 for t in theta]
    initial = [t - 0.2 for t in theta]
    return theta, start, prev, initial


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck_epoch_ops(dtype):
    theta, start, prev, initial = epoch_args(dtype)
    torch.library.opcheck(epoch_geometry.default,
                          (theta, start, prev, initial, True, torch.empty(2, EPOCH_GEOMETRY_COLUMNS, dtype=torch.float64)))
    torch.library.opcheck(sum_of_squares.default, (prev, torch.empty(2, 1, dtype=torch.float64)))


def _fake_call(op, args, kwargs):
    """Runs `op` on fake copies of its arguments: only the fake kernel executes."""
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = torch.utils._pytree.tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs))
        op(*fake[0], **fake[1])


def _broken_step_calls():
    """(id, args, kwargs, message) for calls every kernel must reject."""
    cases = []
    args, kwargs = step_args()
    cases.append(("short-grads", (args[0], args[1][:1], *args[2:]), kwargs, "same length"))
    args, kwargs = step_args()
    cases.append(("moment-shape", (*args[:3], [args[3][0], args[3][1][:-1]], *args[4:]), kwargs, "shape"))
    args, kwargs = step_args()
    cases.append(("moment-dtype", (*args[:3], [args[3][0], args[3][1].float()], *args[4:]), kwargs, "dtype"))
    args, kwargs = step_args(amsgrad=True)
    cases.append(("amsgrad-without-max", (*args[:4], [], *args[5:]), kwargs, "max_exp_avg_sq"))
    args, kwargs = step_args()
    kwargs["stats"] = torch.zeros(2, NUM_STATS + 1, dtype=torch.float64)
    cases.append(("stats-columns", args, kwargs, "stats"))
    args, kwargs = step_args()
    kwargs["stats"] = torch.zeros(2, NUM_STATS, dtype=torch.float32)
    cases.append(("stats-dtype", args, kwargs, "float64"))
    args, kwargs = step_args()
    kwargs["stats"] = torch.zeros(3, NUM_STATS, dtype=torch.float64)
    cases.append(("stats-rows", args, kwargs, "rows"))
    args, kwargs = step_args()
    kwargs["algorithm"] = 7
    cases.append(("algorithm", args, kwargs, "algorithm"))
    args, kwargs = step_args()
    as_int = [[t.to(torch.int32) for t in tensors] for tensors in args[:4]]
    cases.append(("int-params", (*as_int, *args[4:]), kwargs, "float32"))
    return cases


@pytest.mark.parametrize("case", _broken_step_calls(), ids=lambda c: c[0])
@pytest.mark.parametrize("kernel", ["real", "fake"])
def test_adam_step_rejects_bad_calls(case, kernel):
    """The real CPU kernel and the fake kernel reject the same calls."""
    _, args, kwargs, message = case
    with pytest.raises(RuntimeError, match=message):
        if kernel == "real":
            adam_step(*args, **kwargs)
        else:
            _fake_call(adam_step, args, kwargs)


@pytest.mark.parametrize("kernel", ["real", "fake"])
def test_epoch_ops_reject_bad_outputs(kernel):
    theta, start, prev, initial = epoch_args()
    run = (lambda op, a: op(*a)) if kernel == "real" else (lambda op, a: _fake_call(op, a, {}))
    with pytest.raises(RuntimeError, match="out must be"):
        run(epoch_geometry, (theta, start, prev, initial, True, torch.empty(2, 4, dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="shape"):
        run(epoch_geometry, (theta, start, [prev[0], prev[0]], initial, True,
                             torch.empty(2, EPOCH_GEOMETRY_COLUMNS, dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="out must be"):
        run(sum_of_squares, (prev, torch.empty(3, 1, dtype=torch.float64)))


def test_fake_step_accepts_good_calls():
    """The checks do not reject what the kernels accept (every algorithm, amsgrad, prev, mixed dtypes)."""
    for algorithm in _ops.Algorithm:
        args, kwargs = step_args(int(algorithm), amsgrad=True, prev=True)
        _fake_call(adam_step, args, kwargs)
