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
import time
from collections.abc import Callable

import torch

from dmoe.config import DEFAULT_CONFIG, Config, ConfigError, load_config, validate_paths
from dmoe.tools.help_format import HelpFormatter

from .allocator import tune_allocator
from .elastic import join_restarted_group, restarted
from .launchers import LaunchInfo, detect_launch
from .logs import quiet_deepspeed, setup_logging
from .precision import resolve_precision
from .process_group import free_port, group_timeout_s, process_group

ONE_LINE_GRACE_S = 2.0  # ranks != 0 wait this long before exiting with an error
Body = Callable[[Config, LaunchInfo, torch.device, str], None]


def resolve_config(config_path: str, overrides: list[str], info: LaunchInfo) -> tuple[Config, str]:
    """The run's config and engine name, checked against the world size and engine before
    anything starts."""
    from dmoe.parallel.layout import ParallelLayout

    cfg = load_config(config_path, overrides)  # a file, or a packaged config's name
    validate_paths(cfg)
    restarts, restart_var = restarted()
    if not cfg.train.resume and restarts > 0:
        # torchrun --max-restarts or a Slurm requeue started this worker again: continue from
        # the run dir's latest complete checkpoint (or start fresh if there is none yet)
        cfg.train.resume = "auto"
        if info.rank == 0:
            logging.getLogger(__name__).warning(
                "elastic restart %s (%s): train.resume=auto", restarts, restart_var)
    ParallelLayout(info.world_size, tp=cfg.parallel.tp, ep=cfg.parallel.ep).validate(cfg.moe.num_experts)
    cfg.train.precision, why = resolve_precision(cfg.train.precision)  # auto: from the device
    if info.rank == 0:
        logging.getLogger(__name__).info(why)
    engine_name = cfg.train.engine
    if engine_name == "auto":
        engine_name = "deepspeed" if info.launcher == "deepspeed" else "torch"
    if engine_name == "deepspeed":
        from dmoe.train.engines import check_deepspeed

        check_deepspeed(cfg)
        quiet_deepspeed(info.rank)
    return cfg, engine_name


def run_command(config_path: str, local_rank: int | None, overrides: list[str], body: Body) -> int:
    """body(cfg, info, device, engine_name) on this rank. Bad config -> one line before any
    process group exists; a bad checkpoint -> one line; both exit 2. A non-finite loss or
    gradient norm (train.nonfinite) -> one line, exit 3. Every rank fails alike (the checks
    are deterministic or agreed by a collective): only rank 0 writes the line."""
    from dmoe.checkpoint.errors import CheckpointError
    from dmoe.train.nonfinite import NonFiniteError

    from .signals import Interrupted

    info = detect_launch(deepspeed_launcher=local_rank is not None)
    setup_logging(info.rank)
    tune_allocator()  # glibc: resident memory flat over a long run (DMOE_MALLOC)
    try:
        cfg, engine_name = resolve_config(config_path, overrides, info)
    except (ConfigError, ValueError) as err:
        return _one_line("config error", err, info.rank)
    if info.rank == 0:  # relative paths follow the working directory: say where they went
        logging.getLogger(__name__).info("run dir %s, data dir %s", os.path.abspath(cfg.train.run_dir),
                                         os.path.abspath(cfg.data.data_dir))
    try:
        # torchrun --max-restarts: this attempt's own store (timeout as dmoe.startup.process_group)
        join_restarted_group(cfg, info, timeout_s=group_timeout_s(cfg))
        with process_group(cfg, info) as device:
            body(cfg, info, device, engine_name)
    except CheckpointError as err:  # the file and the fault
        return _one_line("checkpoint error", err, info.rank)
    except ConfigError as err:  # found once the data is there (e.g. model.seq_len)
        return _one_line("config error", err, info.rank)
    except NonFiniteError as err:
        return _one_line("training stopped", err, info.rank, code=3)
    except Interrupted as err:  # SIGTERM / SIGINT, train.save_on_signal=false
        return _one_line("interrupted", err, info.rank, code=err.exit_code)
    except KeyboardInterrupt:  # SIGINT before the training loop took over the signals
        return _one_line("interrupted", "SIGINT during start-up", info.rank, code=130)
    return 0


def _one_line(kind: str, err: Exception, rank: int = 0, code: int = 2) -> int:
    if rank == 0:
        sys.stderr.write(f"{kind}: {err}\n")  # plain, whatever the console
        sys.stderr.flush()
    else:
        # the launcher (torchrun, deepspeed) kills the other ranks as soon as one exits
        # non-zero: let rank 0 write the line before this rank's exit code is seen
        time.sleep(ONE_LINE_GRACE_S)
    return code


# ---------------------------------------------------------------- the tools' command line
def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=HelpFormatter,
                                epilog="any other --section.key=value is a config override "
                                       "(`dmoe train --help` lists them)")
    p.add_argument("--config", default=os.environ.get("DMOE_CONFIG", DEFAULT_CONFIG),
                   help="a YAML file, or a packaged config's name; env DMOE_CONFIG")
    p.add_argument("--out", default=None,
                   help="output directory (default: <train.run_dir>/<command>)")
    p.add_argument("--nproc", type=int, default=0,
                   help="spawn this many local ranks with torchrun (0: run in this process)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # set by the deepspeed launcher
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
