"""Shared helpers of the CPU optimizer tests.

Threads: the optimizer tests (ONE_THREAD_MODULES) run with one intra-op thread. torch's fused CPU Adam opens an OpenMP region per
tensor; on a loaded 2-core machine each region can cost milliseconds, which made a 300-step parity
run take minutes. The results do not depend on the thread count (torch splits a tensor at
multiples of 64 bytes and ours at fixed 32768-element items); test_statistics.py checks that for
our kernel with two threads explicitly (`two_threads` fixture).

Instruction sets: both kernels choose their ISA once per process from ATEN_CPU_CAPABILITY, so
the AVX2 variant runs in a child pytest process (`run_isa_subprocess`). The child is told which
capability to expect (IA_EXPECT_CPU_CAPABILITY) and fails at once if torch reports another.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest
import torch

import instrumented_adam as ia

ROOT = Path(__file__).resolve().parent.parent

EXPECT_CAPABILITY_ENV = "IA_EXPECT_CPU_CAPABILITY"

#: The optimizer test modules this conftest's thread setting applies to (other modules in tests/
#: keep the process default).
ONE_THREAD_MODULES = {"test_parity", "test_statistics", "test_epoch", "test_state_dict", "test_bad_input",
                      "test_compile", "test_functional", "test_differentiable"}


def pytest_configure(config):
    config.addinivalue_line("markers", "isa_subprocess: spawns a child pytest run under another CPU capability")


@pytest.fixture(scope="session", autouse=True)
def _check_expected_capability():
    expected = os.environ.get(EXPECT_CAPABILITY_ENV)
    if expected:
        actual = torch.backends.cpu.get_cpu_capability()
        assert actual == expected, f"child run expected CPU capability {expected}, torch reports {actual}"


@pytest.fixture(autouse=True)
def _one_thread(request):
    """One intra-op thread for the optimizer tests (see the module docstring)."""
    if request.module.__name__.rpartition(".")[2] not in ONE_THREAD_MODULES:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def two_threads():
    """Runs a test with two intra-op threads (our kernel's parallel split), then restores one."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def cpu_supports(capability_name: str) -> bool:
    """Whether this CPU can run torch's kernels at `capability_name` (AVX2 / AVX512)."""
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    needed = {"AVX2": ("avx2", "fma"), "AVX512": ("avx512f", "avx512bw", "avx512vl", "avx512dq")}[capability_name]
    words = set(flags.split())
    return all(f in words for f in needed)


def run_isa_subprocess(test_file: str, capability_env: str, expected: str, select: str | None = None,
                       timeout: float = 300) -> str:
    """Runs `test_file` (minus the subprocess-spawning tests; only `-k select` when given) under
    ATEN_CPU_CAPABILITY=capability_env.

    Returns the child's output; fails the calling test with that output when the child fails.
    """
    if os.environ.get(EXPECT_CAPABILITY_ENV):
        pytest.skip("already inside a child run")
    if expected in ("AVX2", "AVX512") and not cpu_supports(expected):
        pytest.skip(f"this CPU cannot run {expected} code")
    env = dict(os.environ)
    env["ATEN_CPU_CAPABILITY"] = capability_env
    env[EXPECT_CAPABILITY_ENV] = expected
    # torch.compile's on-disk cache is keyed without ATEN_CPU_CAPABILITY: a child reusing the
    # kernels the parent generated for AVX-512 (16-lane loops) compiles them for AVX2 (8-lane
    # vectors) and leaves half of each buffer unwritten; the parent reusing a child's 8-lane code
    # with 16-lane vectors writes past small buffers (heap corruption, seen as an abort in
    # test_compiled_step_matches_eager). One cache per capability.
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(),
                                                  f"instrumented_adam_inductor_{capability_env}_{os.getuid()}")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not isa_subprocess",
           str(ROOT / "tests" / test_file)]
    if select:
        cmd += ["-k", select]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"child run under {expected} failed:\n{out}"
    assert " passed" in out, out
    return out


# ---- parameters, gradients, optimizer pairs ------------------------------------------------------

#: SIMD tails: the AVX-512 fp32 vector holds 16 lanes, the AVX2 one 8; torch's remainder loop is
#: split again at 8 (adam_math.h). 65549 and 100003 span several of our 32768-element work items.
ODD_SIZES = (1, 7, 8, 9, 15, 16, 17, 24, 25, 31, 33, 1000)
LARGE_SIZES = (65549, 100003)


def make_params(sizes, dtype=torch.float32, seed=0, scale=1.0, device=None):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        shape = n if isinstance(n, tuple) else (n,)
        out.append((torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device))
    return out


class GradBank:
    """Deterministic, cheap gradients: step t uses a fixed random tensor times a per-step factor.

    Drawing fresh normals for 100k-element tensors every step costs more than the steps
    themselves; a bank of 8 draws scaled by a per-step factor still varies every element's
    magnitude and sign over time.
    """

    def __init__(self, shapes, dtype=torch.float32, seed=1, bank=8):
        gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.bank = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for _ in range(bank)]
                     for s in shapes]
        self.factors = (torch.rand(4096, generator=gen, dtype=torch.float64) * 2 - 0.5).tolist()

    def grads(self, t: int) -> list[torch.Tensor]:
        f = self.factors[t % len(self.factors)]
        return [b[(5 * t) % len(b)] * f for b in self.bank]


def set_grads(params, grads, clone=False):
    for p, g in zip(params, grads):
        p.grad = g.clone() if clone else g


OPTIMIZERS = {
    "Adam": (ia.Adam, torch.optim.Adam),
    "AdamW": (ia.AdamW, torch.optim.AdamW),
    "Adamax": (ia.Adamax, torch.optim.Adamax),
}


def state_keys(opt) -> tuple[str, ...]:
    """torch's state keys of an optimizer (ours keep the same names)."""
    if isinstance(opt, torch.optim.Adamax):
        return ("step", "exp_avg", "exp_inf")
    keys = ("step", "exp_avg", "exp_avg_sq")
    if any(g.get("amsgrad") for g in opt.param_groups):
        keys += ("max_exp_avg_sq",)
    return keys


def assert_same_state(ours, theirs, params_ours, params_theirs, msg=""):
    """Parameters and every torch state tensor bitwise equal (torch.equal)."""
    keys = state_keys(theirs)
    for i, (p, q) in enumerate(zip(params_ours, params_theirs)):
        assert torch.equal(p, q), f"{msg} param {i} (numel {p.numel()}): max |diff| {(p.double() - q.double()).abs().max()}"
        sp, sq = ours.state.get(p, {}), theirs.state.get(q, {})
        for k in keys:
            if k not in sq:
                assert k not in sp or k == "max_exp_avg_sq", f"{msg} param {i}: {k} only in ours"
                continue
            assert torch.equal(sp[k], sq[k]), (
                f"{msg} param {i} (numel {p.numel()}) state {k}: max |diff| {(sp[k].double() - sq[k].double()).abs().max()}"
            )


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two float32/bf16/fp16 tensors."""
    assert a.dtype == b.dtype
    if a.numel() == 0:
        return 0
    int_type, sign = {torch.float32: (torch.int32, 1 << 31), torch.bfloat16: (torch.int16, 1 << 15),
                      torch.float16: (torch.int16, 1 << 15)}[a.dtype]

    def line(x):  # sign-magnitude bit patterns onto a monotone integer line
        bits = x.contiguous().view(int_type).long() & ((sign << 1) - 1)
        return torch.where(bits >= sign, -(bits - sign), bits)

    return int((line(a) - line(b)).abs().max())


def snapshot(opt, params):
    """Deep copies of params and their optimizer state (tensors cloned)."""
    return [
        (p.detach().clone(), {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state.get(p, {}).items()})
        for p in params
    ]


from torch.utils._python_dispatch import TorchDispatchMode as TorchDispatchModeBase  # noqa: E402


class OpCounter(TorchDispatchModeBase):
    """Counts the aten ops run inside it by name. Reads of the given optimizers' step counters
    (one-element int64 tensors that live on the CPU whatever the parameters' device, so reading one never
    waits for a GPU) are named "<op> (step counter)", so that a test can forbid every other read."""

    def __init__(self, *optimizers) -> None:
        super().__init__()
        self.ops: list[str] = []
        self._counters = [opt._ia.step_count for opt in optimizers]
        assert all(c.device.type == "cpu" for c in self._counters)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if args and any(args[0] is c for c in self._counters):
            name += " (step counter)"
        self.ops.append(name)
        return func(*args, **(kwargs or {}))

    def counts(self, device_only: bool = False):
        import collections

        return collections.Counter(op for op in self.ops if not (device_only and op.endswith("(step counter)")))


def assert_graph_replay_matches_eager(eager, graphed, eager_p, graph_p, grads, warmup: int = 3) -> None:
    """CUDA graphs: `graphed` (whose params hold static .grad tensors) is warmed up on a side
    stream, one step is captured and replayed for the remaining gradients, while `eager` steps the
    same gradients; after each replay parameters, state and the live statistics buffer (a stable
    address: the graph fills it) must equal the eager optimizer's bitwise. An epoch ends during
    warm-up, so the captured step also reads the previous epoch's step."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for t in range(warmup):
            for p, g in zip(graph_p, grads[t]):
                p.grad.copy_(g)
            graphed.step()
            if t == 1:
                graphed.end_epoch()
    torch.cuda.current_stream().wait_stream(side)
    for t in range(warmup):
        for p, g in zip(eager_p, grads[t]):
            p.grad = g.clone()
        eager.step()
        if t == 1:
            eager.end_epoch()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for t in range(warmup, len(grads)):
        for p, g in zip(graph_p, grads[t]):
            p.grad.copy_(g)
        graph.replay()
        for p, g in zip(eager_p, grads[t]):
            p.grad = g.clone()
        eager.step()
        torch.cuda.synchronize()
        for p, q in zip(graph_p, eager_p):
            assert torch.equal(p, q), f"step {t}"
            for k, v in eager.state[q].items():
                if torch.is_tensor(v):
                    assert torch.equal(graphed.state[p][k], v), f"step {t} state {k}"
        assert torch.equal(graphed._layout.stats, eager._layout.stats), f"step {t} statistics"


def small_model_params(device, seed: int = 0) -> list:
    """The CUDA tests' small model on `device`: a matrix, a bias, a long vector and an odd shape."""
    return [p.requires_grad_() for p in make_params(((64, 33), (33,), (1000,), (5, 7)), seed=seed, device=device)]


def run_without_host_sync(step, times: int = 3) -> None:
    """Calls step() `times` times with torch.cuda's sync debug mode at "error": any host
    synchronisation inside raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(times):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def grad_scaler_train_step(opt, params, weights):
    """A GradScaler training step on a quadratic loss of `params` (for the no-host-sync tests)."""
    scaler = torch.amp.GradScaler("cuda")

    def train_step():
        opt.zero_grad(set_to_none=False)
        loss = sum((p * w).sum() + 0.5 * (p * p).sum() for p, w in zip(params, weights))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return train_step


def random_grads_step(opt, params):
    """A step with fresh random gradients that also reads the step's statistics."""

    def step():
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        opt.last_step_statistics()

    return step
