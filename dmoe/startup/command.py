"""The start-up every command that trains shares (`dmoe train`, profile, tune-capacity,
bench-comm): logging, config + overrides, layout and engine checks, the process group,
and the one-line errors users see; plus the tools' common command line (--config, --out,
--nproc, which re-launches the command under torchrun).

    return run_command(args.config, args.local_rank, overrides, body)   # body(cfg, info, device, engine_name)
    return run_tool("profile", argv, args, overrides, body)              # the same, or --nproc N
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Callable

import torch

from dmoe.config import Config, ConfigError, load_config, validate_paths

from .launchers import LaunchInfo, detect_launch
from .process_group import free_port, process_group

DEFAULT_CONFIG = "configs/default.yaml"
Body = Callable[[Config, LaunchInfo, torch.device, str], None]


def setup_logging(rank: int) -> None:
    from rich.logging import RichHandler

    level = logging.INFO if rank == 0 else logging.WARNING
    handler = RichHandler(show_path=False, markup=False, rich_tracebacks=False)
    logging.basicConfig(level=level, format=f"[r{rank}] %(message)s" if rank else "%(message)s",
                        handlers=[handler], force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_config(config_path: str, overrides: list[str], info: LaunchInfo) -> tuple[Config, str]:
    """The run's config and engine name, checked against the world size and engine before
    anything starts."""
    from dmoe.parallel.layout import ParallelLayout

    path = config_path if os.path.exists(config_path) or config_path != DEFAULT_CONFIG else None
    cfg = load_config(path, overrides)
    validate_paths(cfg)
    ParallelLayout(info.world_size, tp=cfg.parallel.tp, ep=cfg.parallel.ep).validate(cfg.moe.num_experts)
    engine_name = cfg.train.engine
    if engine_name == "auto":
        engine_name = "deepspeed" if info.launcher == "deepspeed" else "torch"
    if engine_name == "deepspeed":
        from dmoe.train.engines import check_deepspeed

        check_deepspeed(cfg)
    return cfg, engine_name


def run_command(config_path: str, local_rank: int | None, overrides: list[str], body: Body) -> int:
    """body(cfg, info, device, engine_name) on this rank. Bad config -> one line before any
    process group exists; a bad checkpoint -> one line; both exit 2. A non-finite loss or
    gradient norm (train.nonfinite) -> one line, exit 3. Every rank fails alike (the checks
    are deterministic or agreed by a collective): only rank 0 writes the line."""
    from dmoe.checkpoint.errors import CheckpointError
    from dmoe.train.nonfinite import NonFiniteError

    info = detect_launch(deepspeed_launcher=local_rank is not None)
    setup_logging(info.rank)
    try:
        cfg, engine_name = resolve_config(config_path, overrides, info)
    except (ConfigError, ValueError) as err:
        return _one_line("config error", err, info.rank)
    try:
        with process_group(cfg, info) as device:
            body(cfg, info, device, engine_name)
    except CheckpointError as err:  # the file and the fault
        return _one_line("checkpoint error", err, info.rank)
    except ConfigError as err:  # found once the data is there (e.g. model.seq_len)
        return _one_line("config error", err, info.rank)
    except NonFiniteError as err:
        return _one_line("training stopped", err, info.rank, code=3)
    return 0


def _one_line(kind: str, err: Exception, rank: int = 0, code: int = 2) -> int:
    if rank == 0:
        sys.stderr.write(f"{kind}: {err}\n")  # plain, whatever the console
    return code


# ---------------------------------------------------------------- the tools' command line
def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
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
    cmd = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           "-m", "dmoe.cli", command, *clean]
    return subprocess.call(cmd)


def run_tool(command: str, argv: list[str], args: argparse.Namespace, overrides: list[str],
             body: Body) -> int:
    """`--nproc N`: re-run under torchrun; else body(cfg, info, device, engine_name) here."""
    if args.nproc > 1:
        return relaunch_under_torchrun(command, argv, args.nproc)
    return run_command(args.config, args.local_rank, overrides, body)
