#!/usr/bin/env bash
# launch/mpi/train.sh NP [--config FILE] [--section.key=value ...]
# Ranks are discovered through mpi4py (COMM_WORLD); MASTER_ADDR/PORT are broadcast from rank 0.
set -euo pipefail
np=${1:?usage: launch/mpi/train.sh NP [train args]}; shift
mpirun=${MPIRUN:-$(command -v mpirun || echo .venv/bin/mpirun)}
root_flags=()
[ "$(id -u)" = 0 ] && root_flags=(--allow-run-as-root)
exec "$mpirun" "${root_flags[@]}" -np "$np" -x OMP_NUM_THREADS=1 .venv/bin/python launch/train.py "$@"
