#!/usr/bin/env bash
# Does an MoE learn subject experts? The BTX / upcycling / from-scratch / dense comparison
# at equal training tokens on the built-in multi-domain corpus (dmoe/tools/experiment.py).
#   launch/experiments/btx.sh                          # defaults: 1000 steps per model (~7 min here)
#   launch/experiments/btx.sh --steps 400 --out runs/btx-small
#   launch/experiments/btx.sh --model.d_model=128 --model.n_layers=8   # scaled by config
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m dmoe.cli experiment btx "$@"
