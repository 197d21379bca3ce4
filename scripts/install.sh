#!/usr/bin/env bash
# One-command setup from a fresh clone: a virtual environment with the CPU build of torch
# (installed first and pinned, so pip never picks a multi-GB CUDA build by itself), the
# project's dependencies, then the project built against that torch without build isolation.
# Usage: ./scripts/install.sh            (creates ./.venv)
#        VENV=/path ./scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip >/dev/null
# torch alone first, pinned: nothing later may replace it.
$PIP install --quiet "torch==${TORCH_VERSION}" ninja numpy
$PIP install --quiet pandas scipy plotly matplotlib tqdm scikit-learn pyarrow tensorboard pytest expecttest hypothesis
$PIP install --quiet --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import instrumented_adam, torch; print('instrumented_adam', instrumented_adam.__version__, 'with torch', torch.__version__, '(' + torch.backends.cpu.get_cpu_capability() + ')')"
