"""`dmoe <command>`: one module per subcommand in dmoe/tools/ (tune-capacity:
tools/tune_capacity.py; import, a Python keyword: tools/hf_import.py), imported on use, so
`dmoe --help` and `dmoe --version` start without torch."""
from __future__ import annotations

import argparse
import difflib
import os
import sys

from dmoe.tools.help_format import HelpFormatter

EXAMPLES = """examples:
  dmoe train --config default --train.steps=50       # one rank, the packaged default config
  deepspeed --num_gpus 2 launch/train.py             # two ranks under DeepSpeed (make train)
  dmoe train --dry-run --world-size 8 --parallel.ep=2   # check a layout, print sizes, exit
  dmoe config show --config mixtral-tiny             # the resolved config as YAML
  dmoe <command> --help                              # a command's own flags"""


def _train_parser(argv: list[str]) -> argparse.ArgumentParser:
    from dmoe.config import DEFAULT_CONFIG, presets

    epilog = "overrides: --section.key=value (e.g. --moe.top_k=1), applied after the config file"
    if "-h" in argv or "--help" in argv:  # the key table costs an import of the schema only
        from dmoe.tools.config_show import keys_help

        epilog += ". Config keys (type, default, description):\n\n" + keys_help()
    parser = argparse.ArgumentParser(
        prog="dmoe train", epilog=epilog, formatter_class=HelpFormatter,
        description="train a MoE transformer on this rank (under any launcher: torchrun, "
                    "deepspeed, srun, mpirun, or none for one rank)")
    parser.add_argument("--config", default=os.environ.get("DMOE_CONFIG", DEFAULT_CONFIG),
                        help=f"a YAML file, or a packaged config's name ({', '.join(presets())}); "
                             "env DMOE_CONFIG")
    parser.add_argument("--dry-run", action="store_true",
                        help="check config and layout, print parameters, FLOPs per token and memory "
                             "per rank, then exit without starting anything")
    parser.add_argument("--world-size", type=int, default=None,
                        help="--dry-run: ranks to check the layout for (default: env WORLD_SIZE, else 1)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return parser


def train_main(argv: list[str]) -> int:
    args, overrides = _train_parser(argv).parse_known_args(argv)
    if args.dry_run:
        from dmoe.tools.dry_run import main as dry_run

        return dry_run(args.config, overrides, args.world_size, args.local_rank is not None)
    from dmoe.startup.command import run_command

    def body(cfg, info, device, engine_name):
        from dmoe.train.trainer import train

        train(cfg, info, device, engine_name)

    return run_command(args.config, args.local_rank, overrides, body)


def layout_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dmoe layout", description="print the rank layout's groups",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--world-size", type=int, required=True, help="ranks in the job")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel degree")
    parser.add_argument("--num-experts", type=int, default=None,
                        help="check that the experts split evenly over ep")
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


COMMANDS = {  # name: (runner, one line for `dmoe --help`)
    "train": (train_main, "train a model (what launch/train.py runs); --dry-run checks and sizes it"),
    "config": (_tool("config_show"), "config show: the resolved config (file or preset + overrides) as YAML"),
    "layout": (layout_main, "print the rank layout's TP / EP / DP groups for a world size"),
    "data": (_tool("data"), "prepare the token files (built-in corpus or your text) ahead of training"),
    "checkpoint": (_tool("checkpoint"), "reshard a checkpoint to another layout, or export it whole"),
    "export": (_tool("export"), "a trained model out of dmoe (--format hf: Hugging Face, or dmoe)"),
    "import": (_tool("hf_import"), "import a Hugging Face MoE model as a dmoe checkpoint"),
    "generate": (_tool("generate"), "sample text from a checkpoint"),
    "profile": (_tool("profile"), "profile training steps: time per MoE phase, all-to-all bytes, HTML report"),
    "bench-comm": (_tool("bench_comm"), "all-to-all bandwidth over message and group sizes (like nccl-tests)"),
    "tune-capacity": (_tool("tune_capacity"), "pick moe.capacity_factor for a target drop rate from real routing"),
    "analyze-routing": (_tool("analyze_routing"), "which experts each domain's tokens choose, per MoE layer"),
    "upcycle": (_tool("upcycle"), "sparse upcycling: a dense checkpoint's MLPs become experts (copies)"),
    "merge": (_tool("merge"), "dense checkpoints of one architecture become one MoE (Branch-Train-MiX)"),
    "experiment": (_tool("experiment"), "btx: does an MoE learn subject experts? (four models, one report)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dmoe <command> [args]   (dmoe <command> --help for its flags)", "",
             "Distributed Mixture-of-Experts training: expert, data and tensor parallel.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help  this help", "  --version   dmoe's version", "", EXAMPLES]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0
    if argv and argv[0] == "--version":
        from dmoe import __version__

        sys.stdout.write(f"dmoe {__version__}\n")
        return 0
    if not argv or argv[0] not in COMMANDS:
        if argv:
            close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            sys.stderr.write(f"dmoe: unknown command {argv[0]!r}{hint}\n\n")
        sys.stderr.write(usage())
        return 2
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
