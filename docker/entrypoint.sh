#!/usr/bin/env bash
# One container per node; the nodes meet through torchrun's c10d rendezvous at
# MASTER_ADDR:MASTER_PORT (hosted by the torchrun on that address), which also numbers them.
# Environment (all optional on a single node):
#   NNODES (1)  NPROC_PER_NODE (GPUs, or 2 on CPU)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
#   RDZV_ID (dmoe: the job's name; nodes of one job share it)  MAX_RESTARTS (0)
#   ENGINE (torch | deepspeed)  NODE_RANK (only logged: c10d assigns the node ranks)
#   LOCAL_ADDR: this node's address as the others reach it (torchrun --local_addr); it also
#     names the node in the rendezvous, so containers sharing one host name (docker run
#     --network host on one machine, where each torchrun has the same PID) need distinct ones
# Arguments go to launch/train.py (--config, dotted overrides).
set -euo pipefail
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
nproc=${NPROC_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 2)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
echo "dmoe-entrypoint: node ${NODE_RANK:-?} of ${NNODES:-1}, $nproc ranks, rendezvous c10d at $endpoint" >&2
exec torchrun --nnodes "${NNODES:-1}" --nproc_per_node "$nproc" \
    --rdzv_backend c10d --rdzv_endpoint "$endpoint" --rdzv_id "${RDZV_ID:-dmoe}" \
    --max_restarts "${MAX_RESTARTS:-0}" ${LOCAL_ADDR:+--local_addr "$LOCAL_ADDR"} \
    launch/train.py --train.engine="${ENGINE:-torch}" "$@"
