#!/usr/bin/env bash
# Compile-checks the CUDA sources on a machine without a GPU or a CUDA build of torch
# (docs/design.md, "Building"): nvcc -c every csrc/cuda/*.cu for sm_90 with full
# ptxas and its register/spill report, and c++ -fsyntax-only the torch glue (csrc/cuda/*.cpp)
# against the installed torch's headers. Nothing is linked or run. Exits non-zero on any error.
#
#   scripts/check_cuda.sh            (uses $PYTHON, else python on PATH, else .venv/bin/python)
#   CUDA_HOME=/path scripts/check_cuda.sh
#   IA_CHECK_ARCH=sm_80 scripts/check_cuda.sh       (another architecture, e.g. to compare registers)
#   IA_TORCH_CUDA_ADAM_FORM=1 scripts/check_cuda.sh  (the other torch arithmetic, docs/cuda.md)
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC="$CUDA_HOME/bin/nvcc"
if [ ! -x "$NVCC" ]; then
  echo "check_cuda: no nvcc at $NVCC (set CUDA_HOME); CUDA compile check skipped"
  exit 0
fi
if [ -z "${PYTHON:-}" ]; then
  if command -v python >/dev/null 2>&1 && python -c 'import torch' >/dev/null 2>&1; then
    PYTHON=python
  else
    PYTHON=.venv/bin/python
  fi
fi
ARCH=${IA_CHECK_ARCH:-sm_90}
COMPUTE=compute_${ARCH#sm_}
CXX=${CXX:-c++}

# torch's include paths and C++ standard, and which fused-Adam arithmetic its CUDA kernel uses
# (setup.py's torch_cuda_adam_form, so the check compiles what the build compiles).
read -r TORCH_INCLUDES CXX_STD FORM < <("$PYTHON" - <<'EOF'
import os, sys
sys.argv = ["setup.py"]
import torch
from torch.utils.cpp_extension import include_paths
src = open("setup.py").read().split("\nclass IsaBuildExtension")[0]
namespace = {"__file__": os.path.abspath("setup.py"), "__name__": "check_cuda"}
exec(compile(src, "setup.py", "exec"), namespace)
std = "c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 10) else "c++17"
print(":".join(include_paths()), std, namespace["torch_cuda_adam_form"]())
EOF
)
TORCH_INC_FLAGS=()
IFS=: read -r -a TORCH_INC_DIRS <<< "$TORCH_INCLUDES"
for d in "${TORCH_INC_DIRS[@]}"; do TORCH_INC_FLAGS+=("-I$d"); done

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
echo "check_cuda: $("$NVCC" --version | tail -1), $ARCH, torch fused-Adam form $FORM, glue as $CXX_STD"

# The .cu files include no torch header (adam_cuda.h says why), so none is on their include path:
# a torch include there fails this check. The defines and flags are those torch's cpp_extension
# adds for nvcc.
NVCC_BASE=(-c -O3 -std=c++17 -gencode "arch=$COMPUTE,code=$ARCH" -Icsrc -D__CUDA_NO_HALF_OPERATORS__
  -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  --expt-relaxed-constexpr -lineinfo -Xcompiler=-ffp-contract=off)
NVCC_FLAGS=("${NVCC_BASE[@]}" -Xptxas -v "-DIA_TORCH_CUDA_ADAM_FORM=$FORM")
CXX_FLAGS=(-fsyntax-only "-std=$CXX_STD" -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCH_API_INCLUDE_EXTENSION_H
  -DTORCH_EXTENSION_NAME=_C "-I$CUDA_HOME/include" "${TORCH_INC_FLAGS[@]}" -Icsrc)

start=$(date +%s)
# Each compile writes its log and an ok/failed status file; at most two run at once (the CI
# machine has two cores).
compile() {  # compile NAME COMMAND...
  local name=$1
  shift
  if "$@" >"$OUT/$name.log" 2>&1; then echo ok; else echo failed; fi >"$OUT/$name.status"
}
for src in csrc/cuda/*.cu csrc/cuda/*.cpp; do
  while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n || true; done
  name=$(basename "$src")
  case "$src" in
    *.cu) compile "$name" "$NVCC" "${NVCC_FLAGS[@]}" "$src" -o "$OUT/$name.o" & ;;
    *) compile "$name" "$CXX" "${CXX_FLAGS[@]}" "$src" & ;;
  esac
done
# The other torch arithmetic (adam_math.h, IA_TORCH_CUDA_ADAM_FORM) must keep compiling too: one
# storage type is enough for that (its ptxas report is not printed).
OTHER_FORM=$((3 - FORM))
while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n || true; done
compile "form$OTHER_FORM" "$NVCC" "${NVCC_BASE[@]}" "-DIA_TORCH_CUDA_ADAM_FORM=$OTHER_FORM" csrc/cuda/adam_kernel_f32.cu -o "$OUT/form$OTHER_FORM.o" &
# (the classic rules' SGD follows the same form: classic_rules.cuh)
while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n || true; done
compile "classic_form$OTHER_FORM" "$NVCC" "${NVCC_BASE[@]}" "-DIA_TORCH_CUDA_ADAM_FORM=$OTHER_FORM" csrc/cuda/classic_kernel_f32.cu -o "$OUT/classic_form$OTHER_FORM.o" &
wait

status=0
for src in csrc/cuda/*.cu csrc/cuda/*.cpp "form$OTHER_FORM" "classic_form$OTHER_FORM"; do
  name=$(basename "$src")
  if [ "$(cat "$OUT/$name.status" 2>/dev/null)" != ok ]; then
    echo "check_cuda: FAILED to compile $src:"
    grep -v "^ptxas info" "$OUT/$name.log" | head -60
    status=1
  fi
done
[ "$status" -eq 0 ] || exit "$status"

# ptxas' report, one line per kernel: registers, spills, stack and shared memory.
"$PYTHON" - "$OUT" <<'EOF'
import glob, re, shutil, subprocess, sys
rows, name, frame = [], None, ("0", "0", "0")
lines = [line for log in sorted(glob.glob(sys.argv[1] + "/*.cu.log")) for line in open(log)]
for line in lines:
    m = re.search(r"Compiling entry function '(\S+)'", line)
    if m:
        name = m.group(1)
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        frame = m.groups()
    m = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)
    if m and name:
        rows.append((name, int(m.group(1)), frame, m.group(2) or "0"))
        name, frame = None, ("0", "0", "0")
names = [r[0] for r in rows]
if shutil.which("c++filt"):
    names = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
algo = {"(instrumented_adam::Algorithm)0": "Adam", "(instrumented_adam::Algorithm)1": "AdamW", "(instrumented_adam::Algorithm)2": "Adamax"}
mode = {"(Stats)0": "stats=off", "(Stats)1": "stats=on", "(Stats)2": "stats=on+prev"}
print(f"{'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>5}  kernel")
spilled = 0
for (_, regs, (stack, st, ld), smem), n in sorted(zip(rows, names), key=lambda r: r[1]):
    n = re.sub(r"instrumented_adam::cuda::detail::(\(anonymous namespace\)::)?", "", n)
    for k, v in {**algo, **mode}.items():
        n = n.replace(k, v)
    n = n.replace("(UpdateLaunch, KernelScalars)", "").replace("void ", "").replace("amsgrad", "")
    n = re.sub(r"(?:instrumented_adam::cuda::detail::)?AdamFamilyRule<(\w+), true>", r"\1+amsgrad", n)
    n = re.sub(r"(?:instrumented_adam::cuda::detail::)?AdamFamilyRule<(\w+), false>", r"\1", n)
    n = re.sub(r"SgdCudaRule<true>", "SGD+momentum", n)
    n = re.sub(r"SgdCudaRule<false>", "SGD", n)
    n = re.sub(r"RmspropCudaRule<(true|false), (true|false)>",
               lambda m: "RMSprop" + ("+momentum" if m.group(1) == "true" else "") + ("+centered" if m.group(2) == "true" else ""), n)
    n = n.replace("AdagradCudaRule", "Adagrad")
    spilled += int(st) + int(ld)
    print(f"{regs:>4} {st + '/' + ld:>11} {stack:>5} {smem:>5}  {n}")
print(f"check_cuda: {len(rows)} kernels, {'no spills' if spilled == 0 else f'SPILLS: {spilled} bytes'}")
EOF
echo "check_cuda: all CUDA sources compile ($(($(date +%s) - start)) s)"
