#!/usr/bin/env bash
# The project's test command (the README's and CI's): the C++ kernel tests under ctest, the CUDA
# compile check (where nvcc exists; GPU tests themselves skip without a GPU), then pytest.
# Run ./scripts/install.sh first (it creates .venv). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
export PATH="$(cd "$VENV/bin" && pwd):$PATH"

echo "== the extension, built incrementally (seconds when nothing changed): tests never run stale kernels"
source scripts/build_progress.sh
LOG="$VENV/.instrumented_adam-build.log"
(MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py build_ext --inplace 2>&1 | build_progress "$LOG") \
  || { tail -40 "$LOG"; exit 1; }

echo "== C++ kernel tests (CMake + ctest, linking the objects just built)"
# The CPU objects of that build: the op schemas, the CPU glue (csrc/cpu/*.cpp) and the ISA copies of the kernel (not the
# Python module, not CUDA). Without them (another build layout), CMake compiles its own.
BUILD_TEMP="$("$PY" -c 'import sys, sysconfig; print(f"build/temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")')"
OBJECTS=""
for obj in $(find "$BUILD_TEMP" -name '*.o' \( -path '*/csrc/ops.o' -o -path '*/csrc/cpu/*.o' \
             -o -regex '.*/isa/adam_kernel_[a-z0-9]*\.o' \) 2>/dev/null | sort); do
  OBJECTS="${OBJECTS:+$OBJECTS;}$(pwd)/$obj"
done
cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DIA_PREBUILT_OBJECTS="$OBJECTS" \
  -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  >build/cmake-configure.log 2>&1 || { cat build/cmake-configure.log; exit 1; }
cmake --build build/cmake -j"$(nproc)" >/dev/null
ctest --test-dir build/cmake --output-on-failure

if [ -x scripts/check_cuda.sh ]; then
  echo "== CUDA compile check"
  scripts/check_cuda.sh
fi

echo "== Python tests"
"$PY" -m pytest -q tests "$@"
