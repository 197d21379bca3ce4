"""Per-step fixed cost: many small tensors (default 1000 of 64 elements), fp32, CPU.

    python bench/bench_many_tensors.py                     # 1 thread, 300 interleaved rounds
    python bench/bench_many_tensors.py --tensors 1000 --numel 64 --threads 1 --repeats 300

With 64 elements per tensor the step moves ~2 KB per tensor, so what is timed is the fixed cost
per tensor (Python, dispatch, argument checks, the per-tensor kernel set-up), not memory. All
optimizers share the parameters and gradients (each keeps its own state) and are timed
interleaved in one process; the figures are medians, ratios to torch.optim.Adam(fused=True).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package

import instrumented_adam as ia  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--numel", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = [torch.randn(args.numel, requires_grad=True) for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.randn(args.numel)
    opts = {
        "torch_fused": torch.optim.Adam(params, lr=1e-3, fused=True),
        "ours_off": ia.Adam(params, lr=1e-3, statistics=False, epoch_geometry=False),
        "ours_stats": ia.Adam(params, lr=1e-3),
        "ours_stats_prev": ia.Adam(params, lr=1e-3),
    }
    opts["ours_stats_prev"].step()
    opts["ours_stats_prev"].end_epoch()
    for opt in opts.values():
        for _ in range(5):
            opt.step()
    times = {k: [] for k in opts}
    order = list(opts)
    for _ in range(args.repeats):
        random.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            opts[k].step()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["torch_fused"])
    print(f"{args.tensors} tensors of {args.numel} elements, {args.threads} thread(s), "
          f"capability {torch.backends.cpu.get_cpu_capability()}, median of {args.repeats} interleaved rounds")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"  {k:16s} {med * 1e3:7.3f} ms  x{med / base:.3f}")


if __name__ == "__main__":
    main()
