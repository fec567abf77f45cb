"""`dmoe <command>`: train (what launch/train.py runs), layout, data, checkpoint, export,
import, generate, profile, bench-comm, tune-capacity, analyze-routing, upcycle, merge,
experiment. Each tool is one module in dmoe/tools/
named after its subcommand (tune-capacity: tools/tune_capacity.py; import, a Python
keyword: tools/hf_import.py), imported on use."""
from __future__ import annotations

import argparse
import os
import sys

from dmoe.startup.command import DEFAULT_CONFIG, run_command


def _split_args(argv: list[str]):
    """--config PATH, --local_rank N (from the deepspeed launcher); the rest are overrides."""
    parser = argparse.ArgumentParser(prog="dmoe train", add_help=True,
                                     epilog="overrides: --section.key=value, e.g. --moe.top_k=1")
    parser.add_argument("--config", default=os.environ.get("DMOE_CONFIG", DEFAULT_CONFIG))
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)
    return parser.parse_known_args(argv)


def train_main(argv: list[str]) -> int:
    args, overrides = _split_args(argv)

    def body(cfg, info, device, engine_name):
        from dmoe.train.trainer import train

        train(cfg, info, device, engine_name)

    return run_command(args.config, args.local_rank, overrides, body)


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
    "data": _tool("data"),
    "checkpoint": _tool("checkpoint"),
    "export": _tool("export"),
    "import": _tool("hf_import"),
    "generate": _tool("generate"),
    "profile": _tool("profile"),
    "bench-comm": _tool("bench_comm"),
    "tune-capacity": _tool("tune_capacity"),
    "analyze-routing": _tool("analyze_routing"),
    "upcycle": _tool("upcycle"),
    "merge": _tool("merge"),
    "experiment": _tool("experiment"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.stderr.write(f"usage: dmoe {{{','.join(COMMANDS)}}} [args]\n")
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
