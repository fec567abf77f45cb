"""Joining the default process group (threads, device, backend) for a run's lifetime.

    with process_group(cfg, info) as device:   # torch.distributed is initialised inside
        ...
"""
from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from dmoe.config import Config

    from .launchers import LaunchInfo


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous this process sets up itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(info: LaunchInfo, backend: str = "auto", timeout_s: int = 600) -> torch.device:
    """Join the default process group (every launcher, world size 1 included) and pick the device."""
    env = os.environ
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if info.world_size > 1:
            raise RuntimeError("MASTER_PORT is not set and the launcher did not provide one")
        env["MASTER_PORT"] = str(free_port())
    env.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank))
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return device


@contextmanager
def process_group(cfg: Config, info: LaunchInfo) -> Iterator[torch.device]:
    """Threads and the default process group for the run's lifetime; torn down after."""
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // info.local_world_size))
    device = init_distributed(info, cfg.parallel.backend)
    try:
        yield device
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
