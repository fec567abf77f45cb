"""Shared command line of the tools that run training steps: parser, --nproc, start-up.

Start-up itself is dmoe.runtime's (the same as `dmoe train`). Every tool runs in-process on one rank, or under torchrun / deepspeed / srun / mpirun for
several (exactly like `dmoe train`); `--nproc N` re-launches the same command under
torchrun on this machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from dmoe.runtime import DEFAULT_CONFIG, run_command


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
    cmd = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
           "-m", "dmoe.cli", command, *clean]
    return subprocess.call(cmd)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tool(command: str, argv: list[str], args, overrides: list[str], body) -> int:
    """`--nproc N`: re-run under torchrun; else body(cfg, info, device, engine) on this rank."""
    if args.nproc > 1:
        return relaunch_under_torchrun(command, argv, args.nproc)
    return run_command(args.config, args.local_rank, overrides, body)


__all__ = ["base_parser", "relaunch_under_torchrun", "run_tool"]
