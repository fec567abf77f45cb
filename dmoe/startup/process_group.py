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


def gpu_job_hint(env=os.environ, nvidia_device: str = "/dev/nvidia0") -> str:
    """Why this process looks like part of a GPU job ("" when nothing says so): Slurm gave it
    GPUs, or the machine has an NVIDIA device node. (Not CUDA_VISIBLE_DEVICES: the DeepSpeed
    launcher sets it on CPU machines too.)"""
    for key in ("SLURM_GPUS_PER_TASK", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        if env.get(key, "").strip() not in ("", "0"):
            return f"{key}={env[key]}"
    if os.path.exists(nvidia_device):
        return f"{nvidia_device} exists"
    return ""


def choose_backend(requested: str, cuda_available: bool, env=os.environ, hint: str | None = None) -> str:
    """auto: nccl with CUDA, gloo without. A GPU job (gpu_job_hint) whose process sees no
    CUDA is an error rather than a silent CPU run, unless gloo was asked for."""
    if requested == "gloo":
        return "gloo"
    if not cuda_available:
        hint = gpu_job_hint(env) if hint is None else hint
        if requested == "nccl" or hint:
            why = "parallel.backend=nccl" if requested == "nccl" else f"a GPU job ({hint})"
            raise RuntimeError(f"{why} but torch sees no CUDA device (torch {torch.__version__}, "
                               f"CUDA build {torch.version.cuda}); pass --parallel.backend=gloo "
                               "to run on the CPU")
        return "gloo"
    return "nccl" if requested == "auto" else requested


def choose_device_index(local_rank: int, local_world_size: int, device_count: int,
                        env=os.environ) -> int:
    """The CUDA ordinal this rank uses: local_rank, or local_rank % device_count where each
    task sees only its own GPU(s) (srun --gpus-per-task: SLURM_GPUS_PER_TASK is set).
    DMOE_GPUS_PER_TASK=1 says the same for other launchers that give each rank its own
    CUDA_VISIBLE_DEVICES. More ranks than visible GPUs otherwise means two ranks would
    share one: refused."""
    if device_count < 1:
        raise RuntimeError("no CUDA device visible")
    per_task = any(env.get(k, "").strip() not in ("", "0")
                   for k in ("SLURM_GPUS_PER_TASK", "DMOE_GPUS_PER_TASK"))
    if per_task:
        return local_rank % device_count
    if local_rank >= device_count or local_world_size > device_count:
        raise RuntimeError(f"{local_world_size} ranks on this node but {device_count} visible GPU(s): "
                           "one rank per GPU (fewer ranks, or srun --gpus-per-task=1)")
    return local_rank


def group_timeout_s(cfg: Config) -> int:
    """The process group's own timeout: above dmoe's watchdog (parallel.timeout_s), so that
    the watchdog's one line (naming the step and collective) comes first."""
    return max(600, int(2 * cfg.parallel.timeout_s))


def init_distributed(info: LaunchInfo, backend: str = "auto", timeout_s: int = 600) -> torch.device:
    """Join the default process group (every launcher, world size 1 included) and pick the device.

    LOCAL_RANK is exported as the chosen CUDA ordinal (DeepSpeed sets its device from it), so
    it names the same GPU as dmoe's device even when each task sees one GPU."""
    env = os.environ
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if info.world_size > 1:
            raise RuntimeError("MASTER_PORT is not set and the launcher did not provide one")
        env["MASTER_PORT"] = str(free_port())
    use_cuda = torch.cuda.is_available()
    backend = choose_backend(backend, use_cuda, env)
    device = torch.device("cpu")
    local_rank = info.local_rank
    if use_cuda:
        local_rank = choose_device_index(info.local_rank, info.local_world_size,
                                         torch.cuda.device_count(), env)
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    env.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(local_rank))
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return device


@contextmanager
def process_group(cfg: Config, info: LaunchInfo) -> Iterator[torch.device]:
    """Threads and the default process group for the run's lifetime; torn down after."""
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // info.local_world_size))
    device = init_distributed(info, cfg.parallel.backend, timeout_s=group_timeout_s(cfg))
    try:
        yield device
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
