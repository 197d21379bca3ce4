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
DEPENDENCIES="pandas scipy plotly matplotlib tqdm scikit-learn pyarrow tensorboard pytest expecttest hypothesis prodigyopt lightning transformers accelerate"
# What an install depends on: when none of it changed since the last successful run (the stamp in
# the venv), the packages and the package metadata are up to date and only the extension needs an
# incremental build (seconds when nothing changed). pip's editable install always rebuilds from
# scratch, so it runs only when the stamp differs.
STAMP="$VENV/.instrumented_adam-install"
LOG="$VENV/.instrumented_adam-build.log"
source scripts/build_progress.sh
WANT="$(cat setup.py scripts/install.sh scripts/build_progress.sh | sha256sum | cut -c1-16) torch==${TORCH_VERSION}"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "== installing torch ${TORCH_VERSION} (CPU) and the dependencies into $VENV"
  $PIP install --quiet --upgrade pip >/dev/null
  # torch alone first, pinned: nothing later may replace it.
  $PIP install --quiet "torch==${TORCH_VERSION}" ninja numpy
  $PIP install --quiet $DEPENDENCIES ray  # ray: the studies' RayExecutor, whose test CI runs (~35 s, 240 MB)
  echo "== building and installing instrumented_adam (the C++ kernels: about 2 minutes on 2 cores)"
  # Verbose so that the build's progress can be shown; the whole output is kept in $LOG.
  MAX_JOBS=${MAX_JOBS:-$(nproc)} $PIP install -v --no-build-isolation --no-deps -e . 2>&1 | build_progress "$LOG" \
    || { tail -40 "$LOG"; exit 1; }
  echo "$WANT" > "$STAMP"
else
  echo "== dependencies up to date; incremental build of the extension"
  (MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VENV/bin/python" setup.py build_ext --inplace 2>&1 | build_progress "$LOG") \
    || { tail -40 "$LOG"; exit 1; }
fi
"$VENV/bin/python" -c "import instrumented_adam, torch; print('instrumented_adam', instrumented_adam.__version__, 'with torch', torch.__version__, '(' + torch.backends.cpu.get_cpu_capability() + ')')"
