#!/usr/bin/env bash
# One container per node. Environment (all optional on a single node):
#   NNODES (1)  NODE_RANK (0)  NPROC_PER_NODE (GPUs, or 2 on CPU)  MASTER_ADDR (127.0.0.1)
#   MASTER_PORT (29500)  ENGINE (torch | deepspeed)
# Arguments go to launch/train.py (--config, dotted overrides).
set -euo pipefail
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
nproc=${NPROC_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 2)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$nproc" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    launch/train.py --train.engine="${ENGINE:-torch}" "$@"
