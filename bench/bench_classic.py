"""One step of SGD, RMSprop and Adagrad: instrumented_adam against torch's fastest CPU path for each.

    python bench/bench_classic.py                         # 2 threads, 1M/10M/50M
    python bench/bench_classic.py --sizes 1M,10M --repeats 10 --out /tmp/quick

Same method as bench_step.py (whose tensor mix and machine description it reuses): the realistic
mix of a few large matrices and ~200 small tensors, random gradients set once, `step()` alone
timed, every configuration of one size in the same process on the same tensors, interleaved in
shuffled rounds; medians, and ratios to torch's fastest path measured alongside:

  SGD (momentum 0.9)      torch.optim.SGD(fused=True)           vs ours off / all statistics
  Adagrad                 torch.optim.Adagrad(fused=True)       vs ours off / all statistics
  RMSprop (centered off)  torch.optim.RMSprop(foreach=True)     vs ours off / all statistics
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import describe_mix, format_size, load_average, machine_info, machine_slug, parse_size, tensor_mix  # noqa: E402

FAMILIES = {
    "SGD": ("fused", dict(lr=1e-2, momentum=0.9)),
    "Adagrad": ("fused", dict(lr=1e-2)),
    "RMSprop": ("foreach", dict(lr=1e-3)),
}


def make(name: str, variant: str, params):
    import torch

    import instrumented_adam as ia

    path, kwargs = FAMILIES[name]
    if variant == "torch":
        return getattr(torch.optim, name)(params, **kwargs, **{path: True})
    return getattr(ia, name)(params, **kwargs, statistics=variant == "ours_stats", epoch_geometry=False)


def measure(name: str, params, repeats: int, warmup: int, seed: int) -> dict:
    variants = ("torch", "ours_off", "ours_stats")
    opts = {v: make(name, v, params) for v in variants}
    for _ in range(warmup):
        for v in variants:
            opts[v].step()
    times = {v: [] for v in variants}
    order = list(variants)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for v in order:
            t0 = time.perf_counter()
            opts[v].step()
            times[v].append(time.perf_counter() - t0)
    del opts
    med = {v: statistics.median(ts) for v, ts in times.items()}
    return {v: {"median_ms": med[v] * 1e3, "ratio": med[v] / med["torch"]} for v in variants}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M,10M,50M")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    info = machine_info("cpu")
    report = {"machine": info, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "threads": args.threads, "repeats": args.repeats, "load_before": load_average(), "results": {}}
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        shapes = tensor_mix(size)
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        for name in FAMILIES:
            report["results"][f"{name}/{format_size(size)}"] = measure(name, params, args.repeats, args.warmup, size)
            print(name, format_size(size), json.dumps(report["results"][f"{name}/{format_size(size)}"]), flush=True)
        report.setdefault("mix", {})[format_size(size)] = describe_mix(shapes)
        del params
    report["load_after"] = load_average()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        lines = [f"# SGD / RMSprop / Adagrad step, {info.get('cpu_model')} ({machine_slug(info, 'cpu')})", "",
                 f"{report['date']}, torch {info['torch']}, capability {info['torch_cpu_capability']}, ISA "
                 f"{' '.join(info.get('isa_flags', []))}, {args.threads} threads, median of {args.repeats} interleaved "
                 f"rounds; load average before {report['load_before']}, after {report['load_after']}.", "",
                 "| optimizer/size | torch ms | ours off ms (ratio) | ours all statistics ms (ratio) |",
                 "| --- | --- | --- | --- |"]
        for key, r in report["results"].items():
            lines.append(f"| {key} | {r['torch']['median_ms']:.2f} | {r['ours_off']['median_ms']:.2f} "
                         f"({r['ours_off']['ratio']:.3f}) | {r['ours_stats']['median_ms']:.2f} ({r['ours_stats']['ratio']:.3f}) |")
        lines += ["", "torch: SGD and Adagrad fused=True, RMSprop foreach=True (its fastest CPU path)."]
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
