"""Start-up shared by `dmoe train` and the tools that run training steps (profile,
tune-capacity, bench-comm): launcher detection, logging, config + overrides, layout and
engine checks, threads, the process group; and the one-line errors users see.

    return run_command(args.config, args.local_rank, overrides, body)  # body(cfg, info, device, engine)
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

from dmoe.config import ConfigError, load_config

DEFAULT_CONFIG = "configs/default.yaml"


def setup_logging(rank: int) -> None:
    from rich.logging import RichHandler

    level = logging.INFO if rank == 0 else logging.WARNING
    handler = RichHandler(show_path=False, markup=False, rich_tracebacks=False)
    logging.basicConfig(level=level, format=f"[r{rank}] %(message)s" if rank else "%(message)s",
                        handlers=[handler], force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_config(config_path: str, overrides: list[str], info):
    """The run's config, checked against the world size and engine before anything starts."""
    from dmoe.parallel.layout import ParallelLayout

    path = config_path if os.path.exists(config_path) or config_path != DEFAULT_CONFIG else None
    cfg = load_config(path, overrides)
    ParallelLayout(info.world_size, tp=cfg.parallel.tp, ep=cfg.parallel.ep).validate(cfg.moe.num_experts)
    engine = cfg.train.engine
    if engine == "auto":
        engine = "deepspeed" if info.launcher == "deepspeed" else "torch"
    if engine == "deepspeed":
        from dmoe.train.engines import check_deepspeed

        check_deepspeed(cfg)
    return cfg, engine


@contextmanager
def process_group(cfg, info):
    """Threads and the default process group for the run's lifetime; torn down after."""
    import torch
    import torch.distributed as dist

    from dmoe.parallel.launch_env import init_distributed

    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // info.local_world_size))
    device = init_distributed(info, cfg.parallel.backend)
    try:
        yield device
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_command(config_path: str, local_rank: int | None, overrides: list[str], body) -> int:
    """body(cfg, info, device, engine) on this rank. Bad config -> one line before any
    process group exists; a bad checkpoint -> one line; both exit 2."""
    from dmoe.parallel.launch_env import detect_launch
    from dmoe.train.shard_spec import CheckpointError

    info = detect_launch(deepspeed_launcher=local_rank is not None)
    setup_logging(info.rank)
    try:
        cfg, engine = resolve_config(config_path, overrides, info)
    except (ConfigError, ValueError) as err:
        return _one_line("config error", err)
    try:
        with process_group(cfg, info) as device:
            body(cfg, info, device, engine)
    except CheckpointError as err:  # the file and the fault
        return _one_line("checkpoint error", err)
    return 0


def _one_line(kind: str, err: Exception) -> int:
    sys.stderr.write(f"{kind}: {err}\n")  # plain, whatever the console
    return 2
