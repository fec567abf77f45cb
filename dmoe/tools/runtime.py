"""Shared start-up of the tool commands: config + overrides, launcher, threads, process group.

Every tool runs in-process on one rank, or under torchrun / deepspeed / srun / mpirun for
several (exactly like `dmoe train`); `--nproc N` re-launches the same command under
torchrun on this machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from contextlib import contextmanager

from dmoe.config import ConfigError, load_config


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    from dmoe.cli import DEFAULT_CONFIG

    p = argparse.ArgumentParser(prog=prog, description=description,
                                epilog="any other --section.key=value is a config override")
    p.add_argument("--config", default=os.environ.get("DMOE_CONFIG", DEFAULT_CONFIG))
    p.add_argument("--out", default=None, help="output directory (default: <train.run_dir>/<command>)")
    p.add_argument("--nproc", type=int, default=0, help="spawn this many local ranks with torchrun")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    return p


def relaunch_under_torchrun(command: str, argv: list[str], nproc: int) -> int:
    """Runs `dmoe <command> argv` (without --nproc) on `nproc` local ranks via torchrun."""
    clean, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if not a.startswith("--nproc="):
            clean.append(a)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
           "-m", "dmoe.cli", command, *clean]
    return subprocess.call(cmd)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(args, overrides: list[str], info):
    from dmoe.cli import DEFAULT_CONFIG
    from dmoe.parallel.layout import ParallelLayout

    path = args.config if os.path.exists(args.config) or args.config != DEFAULT_CONFIG else None
    cfg = load_config(path, overrides)
    ParallelLayout(info.world_size, tp=cfg.parallel.tp, ep=cfg.parallel.ep).validate(cfg.moe.num_experts)
    return cfg


@contextmanager
def runtime(args, overrides: list[str]):
    """Yields (cfg, info, device, engine_name) with the process group up; tears it down.

    Raises ConfigError / ValueError before anything starts, for a one-line message."""
    import torch
    import torch.distributed as dist

    from dmoe.cli import setup_logging
    from dmoe.parallel.launch_env import detect_launch, init_distributed

    info = detect_launch(deepspeed_launcher=args.local_rank is not None)
    setup_logging(info.rank)
    cfg = load(args, overrides, info)
    engine = cfg.train.engine
    if engine == "auto":
        engine = "deepspeed" if info.launcher == "deepspeed" else "torch"
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // info.local_world_size))
    device = init_distributed(info, cfg.parallel.backend)
    try:
        yield cfg, info, device, engine
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def config_error(err: Exception) -> int:
    sys.stderr.write(f"config error: {err}\n")
    return 2


__all__ = ["base_parser", "relaunch_under_torchrun", "runtime", "config_error", "ConfigError"]
