"""DeepSpeed's CPU shared-memory all-reduce buffers: unlinked as soon as every rank has them.

When every rank of a job is on one node (LOCAL_SIZE == world size), DeepSpeed's CPU comm op
creates one 66 MB POSIX shared-memory file per rank at its communication start,
/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>
(deepspeed/ops/csrc/cpu/comm/shm.cpp), maps every peer's, and never unlinks any: each
DeepSpeed-launched run left 132 MB (2 ranks) in /dev/shm. Once every rank has mapped every
peer's file (a barrier after `deepspeed.initialize`), each rank unlinks its own: the mappings
stay valid and the memory goes back when the last rank exits, however it exits.

    release_own_buffer(rank, world_group)   # collective (one barrier); after deepspeed.initialize
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger(__name__)

PREFIX = "deepspeed_allreduce_buffer"


def buffer_path(rank: int, env=os.environ, shm_dir: str = "/dev/shm") -> Path:
    """The file DeepSpeed's shm_initialize creates for `rank` (same name rule as shm.cpp)."""
    return Path(shm_dir) / (
        f"{PREFIX}_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"
    )


def release_own_buffer(
    rank: int, group: dist.ProcessGroup | None, env=os.environ, shm_dir: str = "/dev/shm"
) -> bool:
    """Barrier over `group` (every rank has mapped its peers' buffers by then), then unlink
    this rank's buffer if DeepSpeed made one. Returns whether a file was removed."""
    dist.barrier(group=group)
    path = buffer_path(rank, env, shm_dir)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    log.debug("unlinked %s (mapped by every rank; freed when the last one exits)", path)
    return True
