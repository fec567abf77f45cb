#!/usr/bin/env bash
# Installs the benchmark-only peers of bench/moe_layer.py: torchtitan 0.3.0 (its MoE layer)
# and what its import needs (spmd_types, tyro), into .venv/peers, outside dmoe's own
# dependencies. moe_layer.py appends that directory to sys.path and skips the torchtitan
# peer with one line when it is missing. --no-deps: torchtitan would otherwise pull a torch
# build of its own choosing. Its EP module imports triton; without triton the bench stubs
# that module (the local dispatcher never calls it).
#   bash bench/install_peers.sh [PYTHON]      # default .venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
DEST=.venv/peers
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download --no-deps -d "$TMP" torchtitan==0.3.0 spmd_types==0.2.3
"$PY" -m pip install --upgrade --no-deps --target "$DEST" "$TMP"/torchtitan-0.3.0-*.whl "$TMP"/spmd_types-0.2.3-*.whl
"$PY" -m pip install --upgrade --target "$DEST" tyro==1.0.17
PYTHONPATH="$DEST" "$PY" -c "import sys; sys.path.insert(0, 'bench'); import moe_common; \
assert moe_common.import_torchtitan() is not None; print('torchtitan peer ready in $DEST')"
