"""Optimizer state per parameter element: torch.optim.Adam vs instrumented_adam's epoch-buffer modes.

    python bench/bench_memory.py                 # prints a Markdown table
    python bench/bench_memory.py --numel 10M --out bench/results/memory.md

Builds fp32 parameters in the realistic mix of bench_step.py (a few large matrices, ~200 small
tensors), takes two steps and one end_epoch() (so that every buffer exists, the previous epoch's
step included), and sums the bytes of the distinct storages in `optimizer.state` (the 0-d step
counters included, which is why the figures sit a hair above the round numbers at small sizes).
Nothing is timed: the figures do not depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package

import instrumented_adam as ia  # noqa: E402

from bench_step import parse_size, tensor_mix  # noqa: E402

CONFIGS = {
    "torch.optim.Adam(fused=True)": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "ours, defaults (epoch_buffers='compact')": lambda ps: ia.Adam(ps, lr=1e-3),
    "ours, compact + distance_from_init=True": lambda ps: ia.Adam(ps, lr=1e-3, distance_from_init=True),
    "ours, epoch_buffers='exact'": lambda ps: ia.Adam(ps, lr=1e-3, epoch_buffers="exact"),
    "ours, epoch_geometry=False": lambda ps: ia.Adam(ps, lr=1e-3, epoch_geometry=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=parse_size, default=parse_size("1M"))
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    shapes = tensor_mix(args.numel)
    lines = [f"Optimizer state of fp32 Adam, {sum(int(torch.Size(s).numel()) for s in shapes):,} parameters "
             f"in {len(shapes)} tensors (bench/bench_memory.py, torch {torch.__version__})", "",
             "| optimizer | state, B/element |", "| --- | --- |"]
    for name, factory in CONFIGS.items():
        params = [torch.zeros(s, requires_grad=True) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape)
        opt = factory(params)
        opt.step()
        if hasattr(opt, "end_epoch") and opt.epoch_geometry:
            opt.end_epoch()
        opt.step()
        numel = sum(p.numel() for p in params)
        lines.append(f"| {name} | {ia.state_nbytes(opt) / numel:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
