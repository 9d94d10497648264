#!/usr/bin/env bash
# GPU readiness check (benchmarks/gpu_check.py, details in its docstring and docs/benchmarks.md): on a
# small synthetic study, a few training iterations of the teacher, student and ResEnc trainers with
# nnU-Net's fp16 autocast, efficient inference with fp16 vs fp32 and on-device resampling, the GPU
# memory monitor and the study's inference stage; figures in OUT_DIR/gpu_check.json and gpu_check.md.
#
#   bash scripts/gpu_check.sh [OUT_DIR] [options]     OUT_DIR default: runs/gpu_check
#   bash scripts/gpu_check.sh runs/gpu_check --scale demo --smoke     # bigger cases + the smoke study
#   bash scripts/gpu_check.sh runs/gpu_check_cpu --device cpu --no-resenc   # CPU dry run, no GPU needed
#
# Exit codes: 0 every step passed; 1 a step failed (named in the JSON/markdown); 2 bad arguments;
# 3 no CUDA device (with the default --device cuda): nothing is run, a message says why.
# FLARE_SKIP_SETUP=1 skips scripts/setup_env.sh (the environment must exist then).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FLARE_VENV:-$here/.venv}"
if [ "${FLARE_SKIP_SETUP:-0}" != 1 ]; then
  bash "$here/scripts/setup_env.sh"
fi
out="runs/gpu_check"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  out="$1"
  shift
fi
cd "$here"
exec "$venv/bin/python" "$here/benchmarks/gpu_check.py" "$out" "$@"
