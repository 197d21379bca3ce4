"""Overhead and bandwidth of one optimizer step: instrumented_adam vs torch.optim.Adam.

    python bench/bench_step.py                       # CPU, 1 and 2 threads, 1M/10M/50M, 3 processes
    python bench/bench_step.py --device cuda --sizes 10M,50M,200M
    python bench/bench_step.py --processes 1 --repeats 20 --sizes 1M --out /tmp/quick

What is timed is `optimizer.step()` alone. The gradients are random, set once and never changed,
so every step reads the same data and no forward/backward pass is in the way. All configurations
of one size share the same parameter and gradient tensors (each optimizer keeps its own state),
and are timed in the same process, interleaved: every round runs one step of each configuration
in a freshly shuffled order, so a slow patch of the machine (other jobs, frequency changes) hits
all of them alike. Figures are medians over rounds; ratios are to torch's fused Adam measured in
the same process. With --processes N the whole measurement runs in N fresh processes (memory
placement differs between processes) and the report gives the median over processes and the
spread of the ratios.

Configurations (all Adam, lr=1e-3, default betas/eps, no weight decay):
  torch_fused      torch.optim.Adam(fused=True)                       the reference (ratio 1)
  torch_foreach    torch.optim.Adam(foreach=True)
  ours_off         instrumented_adam.Adam(statistics=False)           the plain fused update
  ours_stats       instrumented_adam.Adam(statistics=True)            all per-step statistics
  ours_stats_prev  ... + epoch_geometry, end_epoch() called once       + Σ Δθ·s_{k-1} (reads s_{k-1})
                   (the default compact epoch buffers: s_{k-1} in bf16, 2 B/element)
  ours_stats_prev_exact  the same with epoch_buffers="exact" (s_{k-1} in fp32, 4 B/element)
  hand_telemetry   torch fused Adam + what a user writes by hand today: snapshot θ before the step,
                   Δθ after it, _foreach_norm of grads, params and Δθ, and Δθ·g per tensor
                   (preallocated buffers, no host synchronisation)

Effective bandwidth uses the 28 bytes/element model of fp32 Adam (read p, g, m, v; write p, m, v)
for every configuration, so GB/s compares work done per second; ours_stats_prev really moves
30 B/element (32 when exact) and hand_telemetry about 68.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BYTES_PER_ELEMENT = 28
CONFIGS = ("torch_fused", "torch_foreach", "ours_off", "ours_stats", "ours_stats_prev", "ours_stats_prev_exact",
           "hand_telemetry")
SMALL_CONFIGS = ("torch_fused", "torch_default", "ours_off", "ours_stats")
COLUMN_HELP = {
    "torch_fused": "torch.optim.Adam(fused=True)",
    "torch_foreach": "torch.optim.Adam(foreach=True)",
    "torch_default": "torch.optim.Adam() (no flag: the for-loop path on CPU, foreach on CUDA)",
    "ours_off": "instrumented_adam.Adam(statistics=False)",
    "ours_stats": "instrumented_adam.Adam(), all statistics",
    "ours_stats_prev": "instrumented_adam.Adam(), all statistics + update_dot_prev_epoch (after end_epoch())",
    "ours_stats_prev_exact": "the same with epoch_buffers='exact' (s_{k-1} in fp32, 4 B/element instead of 2)",
    "hand_telemetry": "torch fused Adam + snapshot + _foreach_norm(grads, params, updates) + update·grad dots",
}


# ---------------------------------------------------------------------------------------------
# the tensor mix


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 10M, 500k, 1000000)")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def format_size(n: int) -> str:
    for unit, scale in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale and n % (scale // 10) == 0:
            value = n / scale
            return f"{value:g}{unit}"
    return str(n)


def mix_width(total: int) -> int:
    """The model width d of tensor_mix: ~sqrt(total / 200), a multiple of 8."""
    return max(16, int(round((total / 200) ** 0.5 / 8)) * 8)


def tensor_mix(total: int) -> list[tuple[int, ...]]:
    """Shapes of a model with `total` parameters, laid out like a small transformer/CNN hybrid.

    ~200 small tensors (what biases, norms and small convs look like in a real model), sized by
    the model width d: 80 biases [d] and [4d], 80 norm weights [d], 30 depthwise convs [d,1,3,3],
    10 stems [32,3,3,3] (sizes that are not multiples of 16, so SIMD tails occur). They hold
    4.8% / 1.3% / 0.6% of the parameters at 1M / 10M / 50M. The rest is in 5 matrices, an
    embedding [V, d] (40%) and 4 projections [., 4d] / [., d] (15% each), each with one vector
    for the few elements that do not fill a row, so that the total is exact. d grows with the model, as
    in real ones: 72 at 1M, 224 at 10M, 496 at 50M.
    """
    d = mix_width(total)
    small: list[tuple[int, ...]] = []
    small += [(d,)] * 40 + [(4 * d,)] * 40  # biases
    small += [(d,)] * 80  # norm weights/biases
    small += [(d, 1, 3, 3)] * 30  # depthwise convs
    small += [(32, 3, 3, 3)] * 10  # stem convs (864 elements)
    small_total = sum(_numel(s) for s in small)
    rest = total - small_total
    if rest <= 0:
        raise ValueError(f"size {total} is too small for the tensor mix (small tensors alone hold {small_total})")
    # 5 matrices: 40% embedding, 4 x 15% projections; rows chosen so the total is exact.
    shares = [0.40, 0.15, 0.15, 0.15, 0.15]
    cols = [d, 4 * d, 4 * d, d, d]
    large: list[tuple[int, ...]] = []
    left = rest
    for i, (share, c) in enumerate(zip(shares, cols)):
        n = left if i == len(shares) - 1 else int(rest * share)
        rows, extra = divmod(n, c)
        large.append((rows, c))
        if extra:
            large.append((extra,))  # the leftover elements as one more (small) vector
        left -= n
    shapes = large + small
    assert sum(_numel(s) for s in shapes) == total
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def describe_mix(shapes: list[tuple[int, ...]]) -> dict:
    sizes = sorted((_numel(s) for s in shapes), reverse=True)
    large = [s for s in shapes if _numel(s) >= 65536]
    return {
        "tensors": len(shapes),
        "large_tensors": [list(s) for s in large],
        "large_fraction": round(sum(_numel(s) for s in large) / sum(sizes), 4),
        "small_tensors": len(shapes) - len(large),
        "small_sizes": sorted({_numel(s) for s in shapes if _numel(s) < 65536}),
    }


def mix_note(sizes: list[int]) -> str:
    parts = []
    for size in sizes:
        desc = describe_mix(tensor_mix(size))
        d = mix_width(size)
        parts.append(
            f"{format_size(size)}: {desc['tensors']} tensors, d={d}, {len(desc['large_tensors'])} large "
            f"({100 * desc['large_fraction']:.1f}% of the parameters)"
        )
    return (
        "5 matrices (embedding 40%, four projections 15% each; 5 short vectors take the elements that "
        "do not fill a row) and 200 small tensors (80 biases [d]/[4d], "
        "80 norm weights [d], 30 depthwise convs [d,1,3,3], 10 stems [32,3,3,3]); " + "; ".join(parts)
    )


SMALL_MODEL = [(96, 64), (96,), (96,), (96,), (32, 96), (32,), (16, 32), (16,)]  # 10,064 params


# ---------------------------------------------------------------------------------------------
# machine


def machine_info(device: str) -> dict:
    import torch

    info: dict = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
        fields = dict(
            (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in text.splitlines()[:40]) if _
        )
        info["cpu_model"] = fields.get("model name", platform.processor())
        info["cpu_family_model"] = f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}"
        flags = set(fields.get("flags", "").split())
        info["isa_flags"] = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile") if f in flags]
        info["hypervisor"] = "hypervisor" in flags
    except OSError:
        info["cpu_model"] = platform.processor() or platform.machine()
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def machine_slug(info: dict, device: str) -> str:
    def slug(text: str) -> str:
        text = re.sub(r"\((R|TM|tm|r)\)", "", text)
        text = re.sub(r"\b(CPU|Processor|NVIDIA|with .*|@ .*)\b", "", text)
        return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")

    if device == "cuda":
        return f"cuda-{slug(info['gpu'])}"
    model = slug(info.get("cpu_model", "unknown"))
    if info.get("cpu_model", "").strip() in ("Intel(R) Xeon(R) Processor", "AMD EPYC Processor"):
        # A hypervisor hiding the generation: the family/model numbers tell the machines apart.
        model += "-f" + info.get("cpu_family_model", "").replace("/", "m")
    return f"cpu-{model}-{info['usable_cpus']}c"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# the optimizers


class HandTelemetry:
    """What a competent user writes today for per-tensor step telemetry around torch's fused Adam.

    Preallocated snapshot buffers and flattened views; everything stays on the device (no .item()).
    Per step: θ_old ← θ (one _foreach_copy_), the fused step, −Δθ = θ_old − θ in place, then
    ‖g‖, ‖θ‖, ‖Δθ‖ with _foreach_norm and Δθ·g with one dot per tensor (torch has no foreach dot).
    Memory traffic: 8 (copy) + 28 (step) + 12 (sub) + 12 (norms) + 8 (dots) = 68 B/element, so
    even at full bandwidth it cannot be faster than ~2.4x the fused step alone.
    """

    def __init__(self, params, **kwargs):
        import torch

        self.torch = torch
        self.params = list(params)
        self.opt = torch.optim.Adam(self.params, fused=True, **kwargs)
        self.snapshot = [torch.empty_like(p) for p in self.params]
        self.flat_snapshot = [s.view(-1) for s in self.snapshot]
        self.results = torch.empty(4, len(self.params), dtype=torch.float32, device=self.params[0].device)

    def step(self):
        torch = self.torch
        with torch.no_grad():
            torch._foreach_copy_(self.snapshot, self.params)
            self.opt.step()
            # θ_old − θ_new = −Δθ in place: norms do not care about the sign, and negating the
            # 200-odd dot products is cheaper than another pass over the parameters.
            torch._foreach_sub_(self.snapshot, self.params)
            grads = [p.grad for p in self.params]
            self.results[0] = torch.stack(torch._foreach_norm(grads))
            self.results[1] = torch.stack(torch._foreach_norm(self.params))
            self.results[2] = torch.stack(torch._foreach_norm(self.snapshot))
            torch.neg(torch.stack([torch.dot(u, g.view(-1)) for u, g in zip(self.flat_snapshot, grads)]), out=self.results[3])


def make_optimizer(name: str, params):
    import torch

    import instrumented_adam as ia

    lr = 1e-3
    if name == "torch_fused":
        return torch.optim.Adam(params, lr=lr, fused=True)
    if name == "torch_foreach":
        return torch.optim.Adam(params, lr=lr, foreach=True)
    if name == "torch_default":
        return torch.optim.Adam(params, lr=lr)
    if name == "ours_off":
        return ia.Adam(params, lr=lr, statistics=False, epoch_geometry=False)
    if name == "ours_stats":
        return ia.Adam(params, lr=lr, statistics=True, epoch_geometry=False)
    if name in ("ours_stats_prev", "ours_stats_prev_exact"):
        buffers = "exact" if name == "ours_stats_prev_exact" else "compact"
        opt = ia.Adam(params, lr=lr, statistics=True, epoch_geometry=True, epoch_buffers=buffers)
        opt.step()  # creates the state and the epoch-start snapshot
        opt.end_epoch()  # creates s_{k-1}: from now on every step also reads it
        return opt
    if name == "hand_telemetry":
        return HandTelemetry(params, lr=lr)
    raise ValueError(name)


class Timer:
    """Wall time of one call: perf_counter on CPU; CUDA events between synchronisations on GPU."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn) -> float:
        """Seconds fn() took."""
        if self.cuda:
            self.torch.cuda.synchronize()
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def measure(names, params, timer, repeats: int, warmup: int, seed: int) -> dict[str, dict]:
    """Median (and quartiles) of per-step seconds for each optimizer, interleaved in shuffled rounds."""
    optimizers = {name: make_optimizer(name, params) for name in names}
    steps = {name: opt.step for name, opt in optimizers.items()}
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    order = list(names)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            times[name].append(timer(steps[name]))
    del optimizers, steps
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[name] = {"median_s": statistics.median(ts), "q1_s": q[0], "q3_s": q[2], "min_s": min(ts)}
    return out


def run_worker(args) -> dict:
    """One process's measurements: every size x thread count, then the small model."""
    import torch

    import instrumented_adam  # noqa: F401  (fail early when the extension is not built)

    device = torch.device(args.device)
    timer = Timer(device)
    threads = args.threads if device.type == "cpu" else [None]
    result: dict = {"pid": os.getpid(), "load_before": load_average(), "sizes": {}, "small_model": {}}
    gen = torch.Generator(device="cpu").manual_seed(0)
    for size in args.sizes:
        shapes = tensor_mix(size)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        result["sizes"][str(size)] = {}
        for nt in threads:
            if nt is not None:
                torch.set_num_threads(nt)
            repeats = args.repeats if args.repeats else max(15, min(200, int(4e8 / size)))
            res = measure(args.configs, params, timer, repeats, args.warmup, seed=size + (nt or 0))
            result["sizes"][str(size)][str(nt)] = res
            fused = res["torch_fused"]["median_s"]
            print(
                f"[{os.getpid()}] {format_size(size):>4} threads={nt} "
                + " ".join(f"{k}={v['median_s'] * 1e3:.2f}ms({v['median_s'] / fused:.2f})" for k, v in res.items()),
                file=sys.stderr,
                flush=True,
            )
        del params
    if args.small_model:
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in SMALL_MODEL]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        for nt in threads:
            if nt is not None:
                torch.set_num_threads(nt)
            res = measure(SMALL_CONFIGS, params, timer, args.small_repeats, 200, seed=nt or 0)
            result["small_model"][str(nt)] = res
            print(
                f"[{os.getpid()}] small threads={nt} "
                + " ".join(f"{k}={v['median_s'] * 1e6:.1f}us" for k, v in res.items()),
                file=sys.stderr,
                flush=True,
            )
    result["load_after"] = load_average()
    return result


# ---------------------------------------------------------------------------------------------
# aggregation and reports


def aggregate(runs: list[dict], args) -> dict:
    """Median over processes of each per-process median; ratio spread over processes."""
    table = []
    threads = [str(t) for t in (args.threads if args.device == "cpu" else [None])]
    for size in args.sizes:
        for nt in threads:
            per_run = [r["sizes"][str(size)][nt] for r in runs]
            row = {"size": size, "threads": None if nt == "None" else int(nt), "configs": {}}
            for name in args.configs:
                ms = [r[name]["median_s"] * 1e3 for r in per_run]
                ratios = [r[name]["median_s"] / r["torch_fused"]["median_s"] for r in per_run]
                iqr = [(r[name]["q3_s"] - r[name]["q1_s"]) / r[name]["median_s"] for r in per_run]
                med = statistics.median(ms)
                row["configs"][name] = {
                    "ms": round(med, 4),
                    "ms_per_process": [round(x, 4) for x in ms],
                    "gbps": round(BYTES_PER_ELEMENT * size / (med / 1e3) / 1e9, 2),
                    "ratio_to_fused": round(statistics.median(ratios), 4),
                    "ratio_per_process": [round(x, 4) for x in ratios],
                    "iqr_rel_median": round(statistics.median(iqr), 4),
                }
            table.append(row)
    small = []
    if args.small_model:
        for nt in threads:
            per_run = [r["small_model"][nt] for r in runs]
            row = {"threads": None if nt == "None" else int(nt), "configs": {}}
            for name in SMALL_CONFIGS:
                us = [r[name]["median_s"] * 1e6 for r in per_run]
                ratios = [r[name]["median_s"] / r["torch_fused"]["median_s"] for r in per_run]
                row["configs"][name] = {
                    "us": round(statistics.median(us), 2),
                    "us_per_process": [round(x, 2) for x in us],
                    "ratio_to_fused": round(statistics.median(ratios), 4),
                }
            small.append(row)
    return {"table": table, "small_model": small}


def noise_summary(report: dict) -> str:
    """How repeatable the figures were: spread within a process and between processes."""
    table = report["results"]["table"]
    if not table:
        return ""
    iqr = sorted(c["iqr_rel_median"] for row in table for n, c in row["configs"].items())
    parts = [
        f"within a process, the interquartile range of the per-step times was {100 * statistics.median(iqr):.1f}% "
        f"of the median (median over all cells; worst cell {100 * iqr[-1]:.1f}%)"
    ]
    if report["processes"] > 1:
        by_threads: dict = {}
        for row in table:
            for name, c in row["configs"].items():
                if name == "torch_fused":
                    continue
                rp = c["ratio_per_process"]
                spread = (max(rp) - min(rp)) / statistics.median(rp)
                by_threads.setdefault(row["threads"], []).append(spread)
        parts.append(
            "between processes, the ratios to torch fused varied by "
            + ", ".join(
                f"{100 * statistics.median(v):.1f}% (median; worst {100 * max(v):.1f}%) at {t or '-'} thread(s)"
                for t, v in sorted(by_threads.items(), key=lambda kv: kv[0] or 0)
            )
        )
    return "; ".join(parts) + "."


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Optimizer step benchmark — {report['machine_name']}",
        "",
        f"- Machine: {m.get('cpu_model')} (family/model {m.get('cpu_family_model')}), "
        f"{m.get('usable_cpus')} usable CPUs, {m.get('memory_gib')} GiB, ISA flags {', '.join(m.get('isa_flags', []))}, "
        f"torch CPU capability {m.get('torch_cpu_capability')}" + (", virtual machine" if m.get("hypervisor") else ""),
    ]
    if "gpu" in m:
        lines.append(f"- GPU: {m['gpu']} ({m['gpu_memory_gib']} GiB), CUDA {m.get('cuda')}")
    lines += [
        f"- torch {m['torch']}, Python {m['python']}, instrumented_adam {report['package_version']}",
        f"- Date: {report['date']}; {report['processes']} fresh processes, {report['repeats_note']}; "
        "1-minute load average before→after each process: "
        + ", ".join(f"{b[0] if b else '?'}→{a[0] if a else '?'}" for b, a in report["load"]),
        f"- Tensor mix: {report['mix_note']}",
        "- ms: median ms/step (median over processes of each process's median). GB/s: 28 B/element "
        "(fp32 Adam: read p, g, m, v; write p, m, v) / ms. ×fused: ratio to torch.optim.Adam(fused=True) "
        "in the same process (median over processes; [min–max] over processes).",
        "",
    ]
    noise = noise_summary(report)
    if noise:
        lines += [f"Noise: {noise}", ""]
    if report.get("notes"):
        lines += [f"Notes: {report['notes']}", ""]
    names = report["configs"]
    header = "| params | threads | " + " | ".join(names) + " |"
    lines += [header, "|" + "---|" * (len(names) + 2)]
    for row in report["results"]["table"]:
        cells = []
        for name in names:
            c = row["configs"][name]
            rp = c["ratio_per_process"]
            spread = f" [{min(rp):.2f}–{max(rp):.2f}]" if len(rp) > 1 and name != "torch_fused" else ""
            cells.append(f"{c['ms']:.3g} ms, {c['gbps']:.0f} GB/s, ×{c['ratio_to_fused']:.2f}{spread}")
        lines.append(f"| {format_size(row['size'])} | {row['threads'] or '-'} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Ours vs hand-written telemetry (speed-up = hand_telemetry ms / ours ms):")
    lines.append("")
    lines.append("| params | threads | ours_stats | ours_stats_prev |")
    lines.append("|---|---|---|---|")
    for row in report["results"]["table"]:
        c = row["configs"]
        if "hand_telemetry" in c:
            cells = [
                f"{c['hand_telemetry']['ms'] / c[n]['ms']:.2f}×" if n in c else "-" for n in ("ours_stats", "ours_stats_prev")
            ]
            lines.append(f"| {format_size(row['size'])} | {row['threads'] or '-'} | " + " | ".join(cells) + " |")
    if report["results"]["small_model"]:
        lines += [
            "",
            f"Small model ({sum(_numel(s) for s in SMALL_MODEL)} parameters in {len(SMALL_MODEL)} tensors): "
            "median µs per step (×torch fused).",
            "",
            "| threads | " + " | ".join(SMALL_CONFIGS) + " |",
            "|" + "---|" * (len(SMALL_CONFIGS) + 1),
        ]
        for row in report["results"]["small_model"]:
            cells = [f"{row['configs'][n]['us']:.1f} µs ×{row['configs'][n]['ratio_to_fused']:.2f}" for n in SMALL_CONFIGS]
            lines.append(f"| {row['threads'] or '-'} | " + " | ".join(cells) + " |")
    lines += ["", "Columns: " + "; ".join(f"`{n}` = {COLUMN_HELP[n]}" for n in names), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", default="1,2", help="comma-separated torch.set_num_threads values (CPU)")
    parser.add_argument("--sizes", default="1M,10M,50M", help="comma-separated parameter counts (k/M/G suffixes)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--repeats", type=int, default=0, help="timed rounds per size (0: ~4e8/size, 15..200)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--small-repeats", type=int, default=2000, help="timed rounds for the small model")
    parser.add_argument("--no-small-model", dest="small_model", action="store_false")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes to repeat the measurement in")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    parser.add_argument("--name", default=None, help="file name stem (default: derived from the machine)")
    parser.add_argument("--notes", default="", help="free text stored with the results (e.g. how loaded the machine was)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",")]
    args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}")
    if "torch_fused" not in args.configs:
        args.configs.insert(0, "torch_fused")  # every ratio is to it

    if args.worker:
        Path(args.worker).write_text(json.dumps(run_worker(args)))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.processes):
            out = Path(tmp) / f"run{k}.json"
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", str(out)]
            print(f"process {k + 1}/{args.processes} (load {load_average()})", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
            runs.append(json.loads(out.read_text()))

    import instrumented_adam

    info = machine_info(args.device)
    name = args.name or machine_slug(info, args.device)
    report = {
        "machine_name": name,
        "machine": info,
        "package_version": instrumented_adam.__version__,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": args.device,
        "processes": args.processes,
        "repeats_note": (
            f"{args.repeats} rounds" if args.repeats else "rounds per size: 4e8/params clamped to 15..200"
        ) + f" after {args.warmup} warm-up rounds",
        "load": [[r["load_before"], r["load_after"]] for r in runs],
        "notes": args.notes,
        "bytes_per_element_model": BYTES_PER_ELEMENT,
        "mix_note": mix_note(args.sizes),
        "mix": {str(s): describe_mix(tensor_mix(s)) for s in args.sizes},
        "configs": args.configs,
        "config_help": {n: COLUMN_HELP[n] for n in args.configs},
        "results": aggregate(runs, args),
        "raw": runs,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=1))
    (out_dir / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out_dir / name}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
