"""The CPU kernel alone, for kernel work: the raw op on one tensor vs torch._fused_adam_.

    python bench/bench_kernel.py --threads 1 --numel 1e5 --repeats 400    # in cache: arithmetic
    python bench/bench_kernel.py --threads 2 --numel 32e6 --repeats 15    # out of cache: memory

`hist` is a statistics step that also takes the histograms (histogram_every's steps); its ratio to
`stats` is printed too. No optimizer, no Python step logic, one fp32 tensor: what remains is the kernel and the fixed cost
of one op call. Interleaved rounds; prints the minimum (the least disturbed run, best for
comparing kernel versions on a busy machine) and the median, both in ms, the ratio of the
minima to torch's fused kernel and the effective GB/s (28 B/element). Configurations: torch,
ours with statistics off, all statistics, + the previous-epoch dot with s_{k-1} in fp32 (prev,
the exact epoch buffers) and in bf16 (prev16, the compact default).
Set ATEN_CPU_CAPABILITY=avx2 (or default) to time another instruction-set build.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import instrumented_adam  # noqa: F401  (loads the op library)
from instrumented_adam import NUM_STATS
from instrumented_adam.core.histogram import HISTOGRAM_BINS, HISTOGRAM_KINDS

BYTES_PER_ELEMENT = 28


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--numel", type=float, default=1e5)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = int(args.numel)
    op = torch.ops.instrumented_adam.adam_step.default

    def fresh():
        return [torch.randn(n)], [torch.zeros(n)], [torch.zeros(n)], [torch.zeros((), dtype=torch.float32)]

    grads = [torch.randn(n)]
    prev = [torch.randn(n) * 1e-3]
    prev_bf16 = [prev[0].to(torch.bfloat16)]  # the compact epoch buffers' previous step
    stats = torch.zeros(1, NUM_STATS, dtype=torch.float64)
    histograms = torch.zeros(1, HISTOGRAM_KINDS, HISTOGRAM_BINS, dtype=torch.int64)
    kw = dict(algorithm=0, lr=1e-3, lr_tensor=None, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
              amsgrad=False, maximize=False, grad_scale=None, found_inf=None, stat_rows=[])

    def ours(with_stats: bool, with_prev: list, with_hist: bool = False):
        p, m, v, s = fresh()
        return lambda: op(p, grads, m, v, [], with_prev, s, stats=stats if with_stats else None,
                          histograms=histograms if with_hist else None, **kw)

    def torch_fused():
        p, m, v, s = fresh()
        return lambda: torch._fused_adam_(p, grads, m, v, [], s, amsgrad=False, lr=1e-3, beta1=0.9, beta2=0.999,
                                          weight_decay=0.0, eps=1e-8, maximize=False)

    fns = {"torch": torch_fused(), "off": ours(False, []), "stats": ours(True, []), "prev": ours(True, prev),
           "prev16": ours(True, prev_bf16), "hist": ours(True, [], True)}
    for f in fns.values():
        for _ in range(3):
            f()
    times = {k: [] for k in fns}
    order = list(fns)
    for _ in range(args.repeats):
        random.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    base = min(times["torch"])
    print(f"numel={n} threads={args.threads} capability={torch.backends.cpu.get_cpu_capability()}")
    for k, ts in times.items():
        print(f"  {k:6s} min {min(ts) * 1e3:8.3f} ms  median {statistics.median(ts) * 1e3:8.3f} ms  "
              f"x{min(ts) / base:.3f}  {BYTES_PER_ELEMENT * n / min(ts) / 1e9:5.1f} GB/s")
    print(f"  hist / stats: min x{min(times['hist']) / min(times['stats']):.3f}  "
          f"median x{statistics.median(times['hist']) / statistics.median(times['stats']):.3f}")


if __name__ == "__main__":
    main()
