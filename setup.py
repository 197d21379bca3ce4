"""Build of instrumented_adam's op library (see docs/design.md, "Building").

torch must already be installed: build with `pip install -e . --no-build-isolation` (or
`./scripts/install.sh`, which does everything). torch is deliberately not a build requirement:
with build isolation pip would fetch a different torch than the one that runs.

The CPU kernel (csrc/cpu/adam_kernel_isa.cpp) is compiled once per instruction set with its own
flags and linked in as extra objects; setuptools has no per-source flags, so `IsaBuildExtension`
compiles those objects itself before the normal build. CUDA sources are built when the installed
torch is a CUDA build (and IA_BUILD_CUDA is not 0).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - exercised by hand
    sys.exit(
        "instrumented_adam: torch is not importable. Install torch first, then build without "
        "isolation:\n    pip install torch==2.13.0 && pip install -e . --no-build-isolation\n"
        "(or run ./scripts/install.sh)"
    )

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
ISA_SOURCE = CSRC / "cpu" / "adam_kernel_isa.cpp"

# Per-ISA flags: the -m flags *and* the CPU_CAPABILITY macros, or at::vec silently falls back to
# its generic (slow) implementation.
ISA_FLAGS: dict[str, list[str]] = {"DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]}
if platform.machine() in ("x86_64", "AMD64"):
    ISA_FLAGS["AVX2"] = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    ISA_FLAGS["AVX512"] = [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ]

# IA_CPU_ISAS=DEFAULT (a comma list) compiles only those copies of the kernel: for test builds that
# must be quick (tests/test_table_extension.py); the glue then dispatches among those only.
_wanted_isas = [x.strip().upper() for x in os.environ.get("IA_CPU_ISAS", "").split(",") if x.strip()]
if _wanted_isas:
    unknown = sorted(set(_wanted_isas) - set(ISA_FLAGS))
    if unknown or "DEFAULT" not in _wanted_isas:
        sys.exit(f"instrumented_adam: IA_CPU_ISAS must name DEFAULT and only {sorted(ISA_FLAGS)}, got {_wanted_isas}")
    ISA_FLAGS = {isa: flags for isa, flags in ISA_FLAGS.items() if isa in _wanted_isas}
ISA_DEFINES = [f"-DIA_HAVE_ISA_{isa}" for isa in ISA_FLAGS]
# IA_EXTRA_DEFINES="-DNAME ..." adds preprocessor definitions to every translation unit (CPU and
# CUDA), e.g. -DIA_TEST_EXTRA_STAT for the statistics table's extension test.
EXTRA_DEFINES = [d for d in os.environ.get("IA_EXTRA_DEFINES", "").split() if d.startswith("-D")]

CXX_STD = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17"
COMMON_FLAGS = [
    # -ffp-contract=off: rounding is spelled out in adam_math.h, never left to the compiler.
    "-O3", CXX_STD, "-fPIC", "-fopenmp", "-g0", "-DNDEBUG", "-ffp-contract=off",
    f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *EXTRA_DEFINES,
]


def want_cuda() -> bool:
    if os.environ.get("IA_BUILD_CUDA", "1") == "0":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and any((CSRC / "cuda").glob("*.cu"))


def torch_cuda_adam_form() -> int:
    """Which arithmetic the installed torch's fused CUDA Adam uses (csrc/adam_math.h,
    IA_TORCH_CUDA_ADAM_FORM), read off its header so that our CUDA kernel matches it bitwise:
    1 = double scalars and a*b + c*d moments (older torch), 2 = compute-type scalars and std::fma
    moments (newer torch). IA_TORCH_CUDA_ADAM_FORM=1|2 overrides."""
    override = os.environ.get("IA_TORCH_CUDA_ADAM_FORM")
    if override:
        return int(override)
    header = Path(torch.__file__).resolve().parent / "include" / "ATen" / "native" / "cuda" / "fused_adam_utils.cuh"
    try:
        text = header.read_text()
    except OSError:
        text = ""
    opmath_scalars = "const opmath_t& beta1" in text
    fma_moments = "std::fma(beta1, exp_avg" in text
    double_scalars = "const double& beta1" in text or "const double beta1" in text
    mul_add_moments = "beta1 * exp_avg + (1 - beta1) * grad" in text
    if opmath_scalars and fma_moments:
        return 2
    if double_scalars and mul_add_moments and not opmath_scalars:
        return 1
    print(
        f"instrumented_adam: warning: cannot tell torch's fused CUDA Adam arithmetic from {header}; "
        "assuming the newer form (IA_TORCH_CUDA_ADAM_FORM=2); fp32 parity with torch may not be bitwise",
        file=sys.stderr,
    )
    return 2


# Where the objects live between builds. setuptools' editable install (`pip install -e .`) compiles
# into a throw-away "<tmp>.build-temp" directory, so the next `setup.py build_ext --inplace` (the
# test command's) and the CMake test build would compile everything again: such a build is
# redirected here, the directory a plain `build_ext` uses. An explicit --build-temp is respected.
STABLE_BUILD_TEMP = ROOT / "build" / f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"


class IsaBuildExtension(cpp_extension.BuildExtension):
    """Compiles the ISA copies of the CPU kernel (in parallel, only when out of date) first,
    saying what it compiles (the build takes minutes on 2 cores)."""

    def finalize_options(self):
        super().finalize_options()
        if self.build_temp and Path(self.build_temp).name.endswith(".build-temp"):
            self.build_temp = str(STABLE_BUILD_TEMP)

    def build_extension(self, ext):
        out_dir = Path(self.build_temp) / "isa"
        out_dir.mkdir(parents=True, exist_ok=True)
        includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{CSRC}"]
        newest_input = max(p.stat().st_mtime for p in CSRC.rglob("*") if p.suffix in (".h", ".cpp"))
        compiler = os.environ.get("CXX", "c++")
        jobs, objects = [], []
        for isa, flags in ISA_FLAGS.items():
            # Other definitions, another object: a cached one must never mix with a different table.
            tag = "" if not EXTRA_DEFINES else "-" + hashlib.sha1(" ".join(EXTRA_DEFINES).encode()).hexdigest()[:8]
            obj = out_dir / f"adam_kernel_{isa.lower()}{tag}.o"
            objects.append(str(obj))
            if obj.exists() and obj.stat().st_mtime >= newest_input:
                continue
            cmd = [compiler, *COMMON_FLAGS, *flags, *includes, "-c", str(ISA_SOURCE), "-o", str(obj)]
            print(f"instrumented_adam: compiling the CPU kernel for {isa}", file=sys.stderr, flush=True)
            jobs.append((isa, cmd, subprocess.Popen(cmd)))
        started = time.monotonic()
        for isa, cmd, job in jobs:
            if job.wait() != 0:
                raise RuntimeError(f"instrumented_adam: compiling the CPU kernel failed: {' '.join(cmd)}")
            print(f"instrumented_adam: CPU kernel for {isa} compiled ({time.monotonic() - started:.0f} s)",
                  file=sys.stderr, flush=True)
        if not jobs:
            print("instrumented_adam: the CPU kernel's ISA copies are up to date", file=sys.stderr, flush=True)
        ext.extra_objects = [*getattr(ext, "extra_objects", []), *objects]
        super().build_extension(ext)


def make_extension():
    sources = [str(CSRC / "ops.cpp"), str(CSRC / "python_module.cpp"), str(CSRC / "cpu" / "adam_cpu.cpp"),
               str(CSRC / "cpu" / "epoch_cpu.cpp"), str(CSRC / "cpu" / "classic_cpu.cpp"), str(CSRC / "step_plan.cpp")]
    # -ffp-contract=off: the glue's double arithmetic (step scalars, epoch sums) rounds as written.
    cxx_flags = ["-O3", "-fopenmp", "-g0", "-ffp-contract=off", f"-I{CSRC}", *ISA_DEFINES, *EXTRA_DEFINES]
    if want_cuda():
        sources += sorted(str(p) for p in (CSRC / "cuda").glob("*.cu"))
        sources += sorted(str(p) for p in (CSRC / "cuda").glob("*.cpp"))
        # No --use_fast_math (and nvcc's defaults -prec-div/-prec-sqrt=true, --fmad=true, as torch
        # builds its own kernels): the update must round as torch.optim.Adam(fused=True) does.
        # The GPU architectures come from TORCH_CUDA_ARCH_LIST, or the visible GPU (docs/cuda.md).
        form = torch_cuda_adam_form()
        print(f"instrumented_adam: building the CUDA kernel (torch {torch.__version__}, fused-Adam form {form})",
              file=sys.stderr)
        # -ffp-contract=off for the host side of the .cu files: adam_math.h's host/device helpers
        # round there exactly as in the CPU kernel's translation units.
        nvcc_flags = ["-O3", f"-I{CSRC}", f"-DIA_TORCH_CUDA_ADAM_FORM={form}", "-lineinfo", "-Xcompiler=-ffp-contract=off",
                      *EXTRA_DEFINES]
        if os.environ.get("IA_PTXAS_VERBOSE") == "1":
            nvcc_flags.append("-Xptxas=-v")
        return cpp_extension.CUDAExtension(
            "instrumented_adam._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "instrumented_adam._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
    )


setup(
    name="instrumented_adam",
    version="0.1.0",
    description="Adam, AdamW and Adamax with fused kernels that measure what the optimizer does",
    packages=find_packages(include=["instrumented_adam", "instrumented_adam.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": IsaBuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "pandas", "scipy", "plotly", "matplotlib", "tqdm"],
    extras_require={
        "demo": ["scikit-learn"],
        # Minimum-bias events from Pythia 8 for the vertex-finding task (demo/pvfinder.py); without
        # it the task uses its parametrised generator.
        "pythia": ["pythia8mc"],
        "export": ["pyarrow", "tensorboard"],
        # The training-framework callbacks (telemetry/lightning.py, telemetry/huggingface.py).
        "lightning": ["lightning"],
        "hf": ["transformers", "accelerate"],
        "test": ["pytest", "expecttest", "hypothesis"],
        # Branching studies on a cluster (studies/executor.py, RayExecutor); local sweeps need nothing.
        "ray": ["ray"],
    },
    entry_points={"console_scripts": ["instrumented-adam=instrumented_adam.demo.cli:main"]},
)
