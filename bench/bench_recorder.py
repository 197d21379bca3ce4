"""End-to-end overhead of the telemetry recorder.

Trains the same model with the same data, in one process, with:

    torch_fused     torch.optim.Adam(fused=True)                       the reference
    torch_default   torch.optim.Adam() (foreach), what most loops run  for information
    ia_plain        instrumented_adam.Adam, statistics and epoch geometry on, opt.end_epoch()
                    at epoch ends, no recorder                          the optimizer's own cost
    ia_recorder     instrumented_adam.Adam + Recorder (a row every step, flush every 100 steps,
                    rec.end_epoch(train_loss=...) at epoch ends)        what a user runs

Variants run one epoch each in turn (rotated order), `--repeats` times; the figure of a variant is
the median over repeats of its ms/step (forward + backward + step, epoch end included), and each
ratio is the median of the per-repeat ratios. A second pass times the recorder's own pieces (the
step hook, a flush, an epoch end) to show where its time goes.

    python bench/bench_recorder.py                 # writes bench/results/recorder-<machine>.{json,md}
    python bench/bench_recorder.py --quick         # a smoke run, nothing written
    python bench/bench_recorder.py --threads 1 --steps 100 --repeats 7 --variants torch_fused ia_plain ia_recorder
                                                   # how the committed CPU results were taken
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

import instrumented_adam as ia
from instrumented_adam.telemetry.recorder import Recorder

RESULTS = Path(__file__).resolve().parent / "results"


# ---- models -----------------------------------------------------------------------------------
class Block(torch.nn.Module):
    """Pre-norm residual MLP block: a LayerNorm, two matrices and their biases."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, hidden)
        self.down = torch.nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def small_mlp() -> torch.nn.Module:
    """~0.27M parameters, 6 tensors (an MNIST-sized MLP)."""
    return torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))


def mix_10m() -> torch.nn.Module:
    """~10M parameters in 76 tensors: 24 large matrices and many small vectors."""
    d, hidden, blocks = 320, 1280, 12
    return torch.nn.Sequential(torch.nn.Linear(784, d), *[Block(d, hidden) for _ in range(blocks)], torch.nn.LayerNorm(d), torch.nn.Linear(d, 10))


MODELS = {"mlp-0.3M": (small_mlp, 64), "mix-10M": (mix_10m, 32)}


# ---- machine ----------------------------------------------------------------------------------
def machine(device: torch.device) -> tuple[str, str]:
    """(slug for file names, description) of the device the benchmark runs on."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        desc = f"{name}, CUDA {torch.version.cuda}"
    else:
        name = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"{name} {torch.get_num_threads()}t"
        threads = torch.get_num_threads()
        desc = f"{name.rsplit(' ', 1)[0]}, {threads} thread{'s' if threads != 1 else ''}"
    slug = re.sub(r"\(r\)|\(tm\)|processor|cpu @.*", "", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")
    return (("cpu-" if device.type == "cpu" else "") + slug), desc


# ---- the timed loop ---------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One optimizer setup on its own copy of the model."""

    def __init__(self, name: str, base: torch.nn.Module, db: Path | None) -> None:
        self.name = name
        self.model = copy.deepcopy(base)
        params = self.model.parameters()
        self.rec = None
        if name == "torch_fused":
            self.opt = torch.optim.Adam(params, lr=1e-4, fused=True)
        elif name == "torch_default":
            self.opt = torch.optim.Adam(params, lr=1e-4)
        else:
            self.opt = ia.Adam(params, lr=1e-4)
            if name == "ia_recorder":
                self.rec = Recorder(self.opt, db, run_name="bench", model=self.model, step_every=1, flush_every=100)

    def epoch(self, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> None:
        total = torch.zeros((), device=batches[0][0].device)
        for i in range(steps):
            x, y = batches[i % len(batches)]
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.detach()
        if self.rec is not None:
            self.rec.end_epoch(train_loss=total / steps)
        elif isinstance(self.opt, ia.Adam):
            self.opt.end_epoch()

    def close(self) -> None:
        if self.rec is not None:
            self.rec.close()


def run_model(name: str, device: torch.device, steps: int, repeats: int, variants: list[str], tmp: Path) -> dict:
    factory, batch = MODELS[name]
    torch.manual_seed(0)
    base = factory().to(device)
    numel = sum(p.numel() for p in base.parameters())
    tensors = sum(1 for _ in base.parameters())
    batches = [(torch.randn(batch, 784, device=device), torch.randint(0, 10, (batch,), device=device)) for _ in range(8)]
    runs = {v: Variant(v, base, tmp / f"{name}.sqlite") for v in variants}
    for v in runs.values():  # warm-up: state allocation, plans, first flush
        v.epoch(batches, min(steps, 5))
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(repeats):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            runs[v].epoch(batches, steps)
            sync(device)
            times[v].append((time.perf_counter() - t0) / steps * 1e3)
            cpu[v].append((time.process_time() - c0) / steps * 1e3)
    for v in runs.values():
        v.close()
    out = {
        "model": name, "parameters": numel, "tensors": tensors, "batch": batch, "steps_per_epoch": steps, "repeats": repeats,
        "ms_per_step": {v: statistics.median(t) for v, t in times.items()},
        "cpu_ms_per_step": {v: statistics.median(t) for v, t in cpu.items()},
        "ms_per_step_all": times,
        "cpu_ms_per_step_all": cpu,
    }

    def ratio(a: str, b: str, source: dict[str, list[float]]) -> float | None:
        if a not in source or b not in source:
            return None
        return statistics.median(x / y for x, y in zip(source[a], source[b]))

    pairs = [("ia_recorder", "torch_fused"), ("ia_plain", "torch_fused"), ("ia_recorder", "ia_plain"), ("ia_recorder", "torch_default")]
    out["ratios"] = {f"{a} / {b}": ratio(a, b, times) for a, b in pairs}
    out["cpu_ratios"] = {f"{a} / {b}": ratio(a, b, cpu) for a, b in pairs}
    return out


# ---- where the recorder's time goes -----------------------------------------------------------
def breakdown(name: str, device: torch.device, steps: int, tmp: Path) -> dict:
    """Wall time of the recorder's pieces (host time; on CUDA the device work is asynchronous).

    step hook: the per-step post-hook; flush: deriving a full ring of buffered steps on the
    device and writing them to the store; end_epoch: the recorder's whole epoch end, of which
    optimizer.end_epoch (the optimizer's epoch-geometry pass) is shown apart.
    """
    # _emit: the capture hands a full ring of steps to the writer (derive on the device, write).
    labels = {"_on_step": "step hook", "_emit": "flush", "end_epoch": "end_epoch"}
    spent: dict[str, list[float]] = {label: [] for label in (*labels.values(), "optimizer.end_epoch")}

    def timed(label, fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                spent[label].append(time.perf_counter() - t0)
        return wrapper

    originals = {(Recorder, attr): getattr(Recorder, attr) for attr in labels}
    originals[(ia.Adam, "end_epoch")] = ia.Adam.end_epoch
    for (cls, attr), fn in originals.items():
        label = labels.get(attr, "optimizer.end_epoch") if cls is Recorder else "optimizer.end_epoch"
        setattr(cls, attr, timed(label, fn))
    try:
        factory, batch = MODELS[name]
        torch.manual_seed(0)
        base = factory().to(device)
        batches = [(torch.randn(batch, 784, device=device), torch.randint(0, 10, (batch,), device=device)) for _ in range(8)]
        v = Variant("ia_recorder", base, tmp / f"breakdown-{name}.sqlite")
        v.epoch(batches, 5)
        for key in spent:
            spent[key].clear()
        for _ in range(2):
            v.epoch(batches, max(steps, 100))
        v.close()
    finally:
        for (cls, attr), fn in originals.items():
            setattr(cls, attr, fn)
    return {k: {"calls": len(t), "median_us": statistics.median(t) * 1e6 if t else None} for k, t in spent.items()}


def markdown(result: dict) -> str:
    lines = [
        f"# Recorder overhead — {result['device']}",
        "",
        f"torch {result['torch']}, instrumented_adam {result['package']}; {result['date']}.",
        "End-to-end training (forward + backward + step, epoch end included) in ms/step, median of "
        f"{result['models'][0]['repeats']} repeats; ratios are medians of per-repeat ratios measured in the same process.",
        "`ia_recorder`: instrumented Adam + Recorder writing a row every step (flush every 100 steps) and an epoch row,",
        "layer rows and a metric at every epoch end. `ia_plain`: the instrumented optimizer alone (statistics and",
        "epoch geometry on).",
        "",
        "| model | params | tensors | batch | steps/epoch | torch fused | torch default | ia plain | ia + recorder | recorder / fused | recorder / ia plain |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def f(x):
        return "—" if x is None else f"{x:.2f}"

    def g(x):
        return "—" if x is None else f"{x:.3f}×"

    for m in result["models"]:
        ms, r = m["ms_per_step"], m["ratios"]
        lines.append(
            f"| {m['model']} | {m['parameters'] / 1e6:.2f}M | {m['tensors']} | {m['batch']} | {m['steps_per_epoch']} | "
            f"{f(ms.get('torch_fused'))} | {f(ms.get('torch_default'))} | {f(ms.get('ia_plain'))} | {f(ms.get('ia_recorder'))} | "
            f"{g(r['ia_recorder / torch_fused'])} | {g(r['ia_recorder / ia_plain'])} |"
        )
    lines += ["", "The same in process CPU time (ms/step; less sensitive to other processes on a shared machine):", "",
              "| model | torch fused | torch default | ia plain | ia + recorder | recorder / fused | recorder / ia plain |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in result["models"]:
        ms, r = m["cpu_ms_per_step"], m["cpu_ratios"]
        lines.append(
            f"| {m['model']} | {f(ms.get('torch_fused'))} | {f(ms.get('torch_default'))} | {f(ms.get('ia_plain'))} | "
            f"{f(ms.get('ia_recorder'))} | {g(r['ia_recorder / torch_fused'])} | {g(r['ia_recorder / ia_plain'])} |"
        )
    lines += ["", "Where the recorder's time goes (host wall time per call, median):", "",
              "| model | step hook | flush (derive + write a ring of steps) | end_epoch (all) | of which optimizer.end_epoch |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for m in result["models"]:
        b = m.get("breakdown") or {}

        def us(k):
            v = (b.get(k) or {}).get("median_us")
            return "—" if v is None else (f"{v:.0f} µs" if v < 1e4 else f"{v / 1e3:.1f} ms")

        lines.append(f"| {m['model']} | {us('step hook')} | {us('flush')} | {us('end_epoch')} | {us('optimizer.end_epoch')} |")
    lines += ["", "Reading the ratios: `recorder / fused` = (`ia plain / fused`: the instrumented optimizer, i.e. the kernel's",
              "statistics and the epoch-geometry pass) × (`recorder / ia plain`: the recorder itself).", ""]
    for m in result["models"]:
        r = m["ratios"]
        if r.get("ia_plain / torch_fused") and r.get("ia_recorder / ia_plain"):
            lines.append(
                f"- {m['model']}: optimizer {r['ia_plain / torch_fused']:.3f}×, recorder {r['ia_recorder / ia_plain']:.3f}× "
                f"→ {r['ia_recorder / torch_fused']:.3f}× in all."
            )
    for note in result.get("notes") or []:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default 200 on CUDA, 40 on CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--variants", nargs="*", default=["torch_fused", "torch_default", "ia_plain", "ia_recorder"])
    parser.add_argument("--machine", default=None, help="name of the results files (default: from the device)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared machine)")
    parser.add_argument("--notes", nargs="*", default=None, help="lines added to the markdown results")
    parser.add_argument("--markdown-from", type=Path, default=None, help="rewrite the .md of an existing results .json and exit")
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 repeat, write nothing")
    args = parser.parse_args()
    if args.markdown_from is not None:
        result = json.loads(args.markdown_from.read_text())
        if args.notes is not None:
            result["notes"] = list(args.notes)
            args.markdown_from.write_text(json.dumps(result, indent=1) + "\n")
        args.markdown_from.with_suffix(".md").write_text(markdown(result))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = args.steps or (200 if device.type == "cuda" else 40)
    repeats = args.repeats
    if args.quick:
        steps, repeats = 3, 1
    slug, desc = machine(device)
    slug = args.machine or slug
    result = {
        "device": desc, "machine": slug, "torch": torch.__version__, "package": ia.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "threads": torch.get_num_threads(), "models": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            m = run_model(name, device, steps, repeats, list(args.variants), Path(tmp))
            m["breakdown"] = breakdown(name, device, steps, Path(tmp)) if "ia_recorder" in args.variants else None
            result["models"].append(m)
            print(json.dumps({k: m[k] for k in ("model", "ms_per_step", "ratios", "breakdown")}, indent=1), flush=True)
    if args.notes:
        result["notes"] = list(args.notes)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"recorder-{slug}.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / f"recorder-{slug}.md").write_text(markdown(result))
        print(f"wrote {RESULTS / f'recorder-{slug}.json'} and .md")


if __name__ == "__main__":
    main()
