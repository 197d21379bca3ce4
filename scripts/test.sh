#!/usr/bin/env bash
# The project's test command (the README's and CI's): the C++ kernel tests under ctest, the CUDA
# compile check (where nvcc exists; GPU tests themselves skip without a GPU), then pytest.
# Run ./scripts/install.sh first (it creates .venv). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
export PATH="$(cd "$VENV/bin" && pwd):$PATH"

echo "== C++ kernel tests (CMake + ctest)"
cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
cmake --build build/cmake -j"$(nproc)" >/dev/null
ctest --test-dir build/cmake --output-on-failure

if [ -x scripts/check_cuda.sh ]; then
  echo "== CUDA compile check"
  scripts/check_cuda.sh
fi

echo "== Python tests"
"$PY" -m pytest -q tests "$@"
