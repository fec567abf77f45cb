"""`dmoe <command>`: train (what launch/train.py runs), layout, data, checkpoint, profile,
bench-comm, tune-capacity. Each tool lives in dmoe/tools/ and is imported on use."""
from __future__ import annotations

import argparse
import logging
import os
import sys

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


def _split_args(argv: list[str]):
    """--config PATH, --local_rank N (from the deepspeed launcher); the rest are overrides."""
    parser = argparse.ArgumentParser(prog="dmoe train", add_help=True,
                                     epilog="overrides: --section.key=value, e.g. --moe.top_k=1")
    parser.add_argument("--config", default=os.environ.get("DMOE_CONFIG", DEFAULT_CONFIG))
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)
    return parser.parse_known_args(argv)


def train_main(argv: list[str]) -> int:
    args, overrides = _split_args(argv)
    from dmoe.parallel.launch_env import detect_launch

    info = detect_launch(deepspeed_launcher=args.local_rank is not None)
    setup_logging(info.rank)
    try:
        cfg = load_config(args.config if os.path.exists(args.config) or args.config != DEFAULT_CONFIG else None,
                          overrides)
        from dmoe.parallel.layout import ParallelLayout

        ParallelLayout(info.world_size, tp=cfg.parallel.tp, ep=cfg.parallel.ep).validate(cfg.moe.num_experts)
    except (ConfigError, ValueError) as err:
        sys.stderr.write(f"config error: {err}\n")  # one plain line, whatever the console
        return 2
    import torch

    from dmoe.parallel.launch_env import init_distributed
    from dmoe.train.trainer import train
    from dmoe.train.shard_spec import CheckpointError

    engine = cfg.train.engine
    if engine == "auto":
        engine = "deepspeed" if info.launcher == "deepspeed" else "torch"
    if engine == "deepspeed":
        from dmoe.train.engines import check_deepspeed

        try:
            check_deepspeed(cfg)
        except ConfigError as err:
            sys.stderr.write(f"config error: {err}\n")
            return 2
    local_threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // info.local_world_size)
    torch.set_num_threads(local_threads)
    device = init_distributed(info, cfg.parallel.backend)
    try:
        train(cfg, info, device, engine)
    except CheckpointError as err:
        sys.stderr.write(f"checkpoint error: {err}\n")  # one line: the file and the fault
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def layout_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dmoe layout", description="print the rank layout's groups")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--num-experts", type=int, default=None)
    a = parser.parse_args(argv)
    from dmoe.parallel.layout import ParallelLayout

    try:
        layout = ParallelLayout(a.world_size, tp=a.tp, ep=a.ep)
        if a.num_experts:
            layout.validate(a.num_experts)
    except ValueError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    sys.stdout.write(layout.describe() + "\n")
    return 0


def _tool(module: str):
    """A `dmoe` subcommand implemented in dmoe.tools.<module>.main, imported on use."""
    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(f"dmoe.tools.{module}").main(argv)
    return run


COMMANDS = {
    "train": train_main,
    "layout": layout_main,
    "data": _tool("data_prepare"),
    "checkpoint": _tool("checkpoint_tools"),
    "profile": _tool("profile_cmd"),
    "bench-comm": _tool("bench_comm"),
    "tune-capacity": _tool("tune_capacity"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.stderr.write(f"usage: dmoe {{{','.join(COMMANDS)}}} [args]\n")
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
