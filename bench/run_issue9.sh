#!/usr/bin/env bash
# Issue 9's CPU benchmarks in one command (results in bench/results/<stem>-issue9-*.md/json):
# optimizer state per element, the step at 10M/50M on 1 and 2 threads under torch's AVX-512 and
# AVX2 capabilities (ATEN_CPU_CAPABILITY; on an AVX2-only machine the avx512 run falls back to
# AVX2, say so), and the per-step fixed cost of 1000 small tensors.
#
#   bench/run_issue9.sh                          # uses .venv/bin/python, 3 processes per run
#   PYTHON=/path/python PROCESSES=2 STEM=cpu-amd-epyc-f25m17-2c NOTES="quiet machine" bench/run_issue9.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PROCESSES=${PROCESSES:-3}
STEM=${STEM:-cpu}
NOTES=${NOTES:-}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, also in the workers
CONFIGS=torch_fused,ours_off,ours_stats,ours_stats_prev,ours_stats_prev_exact
echo "uptime before: $(uptime)"
"$PY" bench/bench_memory.py --numel 1M --out "bench/results/${STEM}-issue9-memory.md"
for cap in avx512 avx2; do
  ATEN_CPU_CAPABILITY=$cap "$PY" bench/bench_step.py --sizes 10M,50M --threads 1,2 --configs "$CONFIGS" \
    --processes "$PROCESSES" --no-small-model --name "${STEM}-issue9-${cap}" --notes "ATEN_CPU_CAPABILITY=$cap. $NOTES"
done
"$PY" bench/bench_many_tensors.py --tensors 1000 --numel 64 --threads 1 | tee "bench/results/${STEM}-issue9-many-tensors.txt"
echo "uptime after: $(uptime)"
