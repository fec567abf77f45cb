"""torchrun --max-restarts and Slurm requeue: what a restarted worker does differently.

    restarts = restart_count()            # TORCHELASTIC_RESTART_COUNT; 0: the first attempt
    n, var = restarted()                  # the same, or SLURM_RESTART_COUNT (requeued job)
    join_restarted_group(cfg, info)       # before process_group(): a fresh store namespace

A restarted job resumes (`train.resume` empty is read as `auto`: dmoe.startup.command),
whether torchrun restarted its workers or Slurm requeued the batch job.
And its process group is joined through a store namespace of its own attempt: torchrun's
static rendezvous keeps the agent's one store for every attempt, so a restarted gloo rank
reads its peer's address from the failed attempt and connectFullMesh fails ("timed out
connecting: Connection refused"; reproduced with a plain gloo script, fixed by the prefix).
"""
from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from dmoe.config import Config

    from .launchers import LaunchInfo


def restart_count(env=os.environ, var: str = "TORCHELASTIC_RESTART_COUNT") -> int:
    value = env.get(var, "0")
    return int(value) if value.isdigit() else 0


def restarted(env=os.environ) -> tuple[int, str]:
    """(how many times this job was started again, the variable that says so): torchrun's
    TORCHELASTIC_RESTART_COUNT, else Slurm's SLURM_RESTART_COUNT (a requeued batch job:
    scontrol requeue, preemption, node failure with --requeue). (0, "") on a first start."""
    for var in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        if (n := restart_count(env, var)) > 0:
            return n, var
    return 0, ""


def join_restarted_group(cfg: Config, info: LaunchInfo, timeout_s: int = 600, env=os.environ) -> bool:
    """On a torchrun restart that uses the agent's store: join the default process group
    under the prefix `dmoe/attempt_<n>` (dmoe.startup.process_group then finds it
    initialised). Returns whether it did."""
    n = restart_count(env)
    if n == 0 or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return False
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), info.world_size,
                          is_master=False, timeout=timeout)
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.PrefixStore(f"dmoe/attempt_{n}", store),
                            rank=info.rank, world_size=info.world_size, timeout=timeout)
    return True
