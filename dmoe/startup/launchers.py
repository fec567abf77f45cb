"""Where this process sits in the job, whoever launched it: rank, world size, local rank.

Understood launchers: torchrun and the deepspeed launcher (RANK/WORLD_SIZE/LOCAL_RANK),
Slurm's srun (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), mpirun (rank discovery through
mpi4py; OMPI_*/PMI_* variables as a fallback), and a plain `python` (one rank).
"""
from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
from dataclasses import dataclass

from .process_group import free_port

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # torchrun | deepspeed | slurm | mpi | single


def _mpi_info() -> LaunchInfo | None:
    if not any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        return None
    try:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        rank, world, lrank, lworld = comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size()
        if "MASTER_ADDR" not in os.environ:
            host = "127.0.0.1" if lworld == world else socket.gethostbyname(socket.gethostname())
            os.environ["MASTER_ADDR"] = comm.bcast(host, root=0)
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(comm.bcast(free_port() if rank == 0 else None, root=0))
        return LaunchInfo(rank, world, lrank, lworld, "mpi")
    except ImportError:
        env = os.environ
        return LaunchInfo(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                          int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                          int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1)), "mpi")


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True).stdout


def first_node(nodelist: str) -> str:
    """The first host of a Slurm nodelist without scontrol: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    head = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _slurm_master_addr() -> str:
    """The step's first node (where rank 0 runs): its host name, or, where that name does
    not resolve (virtual nodes such as the test cluster's vn1), the NodeAddr Slurm uses."""
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    if int(os.environ.get("SLURM_NNODES", "1")) <= 1 or not nodes:
        return "127.0.0.1"
    try:
        first = _scontrol("show", "hostnames", nodes).split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return first_node(nodes)
    try:
        socket.getaddrinfo(first, None)
        return first
    except OSError:
        pass
    try:
        fields = dict(f.split("=", 1) for f in _scontrol("show", "node", "-o", first).split() if "=" in f)
        log.info("slurm node %s does not resolve; MASTER_ADDR from its NodeAddr", first)
        return fields.get("NodeAddr") or first
    except (OSError, subprocess.CalledProcessError):
        return first


def slurm_tasks_on_node(spec: str, node_id: int) -> int:
    """Tasks on node `node_id` from Slurm's compressed per-node counts: '2(x3),1' -> 2,2,2,1."""
    counts: list[int] = []
    for part in spec.split(","):
        n, _, rep = part.partition("(x")
        counts += [int(n)] * int(rep.rstrip(")") or 1)
    return counts[min(node_id, len(counts) - 1)]


def _slurm_info() -> LaunchInfo:
    env = os.environ
    env.setdefault("MASTER_ADDR", _slurm_master_addr())
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or env["SLURM_NTASKS"]
    return LaunchInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                      slurm_tasks_on_node(spec, int(env.get("SLURM_NODEID", 0))), "slurm")


def detect_launch(deepspeed_launcher: bool = False) -> LaunchInfo:
    """This process's place in the job, from the first launcher whose variables are set."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed" if deepspeed_launcher else "torchrun"
        return LaunchInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                          int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", env["WORLD_SIZE"]))), launcher)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return _slurm_info()
    mpi = _mpi_info()
    if mpi is not None:
        return mpi
    return LaunchInfo(0, 1, 0, 1, "single")
