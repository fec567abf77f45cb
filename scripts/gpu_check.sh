#!/usr/bin/env bash
# dmoe's GPU path in minutes on one GPU: scripts/gpu_check.py's parts, one JSON summary
# (runs/gpu-check/gpu_check.json unless --out). Without a GPU the CUDA-only parts are
# skipped ("no GPU") and the rest run on the CPU. Arguments go to scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${DMOE_PYTHON:-.venv/bin/python}" scripts/gpu_check.py "$@"
