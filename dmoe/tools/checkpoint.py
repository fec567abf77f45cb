"""`dmoe checkpoint reshard|export`: a thin command over dmoe.checkpoint.offline.

    dmoe checkpoint reshard SRC OUT --world-size 8 --tp 2 --ep 4
        OUT becomes a checkpoint for that layout (resume with --train.resume=OUT)
    dmoe checkpoint export SRC model.safetensors
        one file: every parameter whole, named as the unsharded model's named_parameters()
"""
from __future__ import annotations

import argparse
import logging
import sys

from dmoe.checkpoint.errors import CheckpointError
from dmoe.checkpoint.offline import export, reshard
from dmoe.tools.help_format import HelpFormatter, summary


def main(argv: list[str]) -> int:
    """Errors are one line on stderr, exit 2."""
    parser = argparse.ArgumentParser(prog="dmoe checkpoint", formatter_class=HelpFormatter,
                                     description=summary(__doc__))
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reshard", help="write a checkpoint for another layout",
                       formatter_class=HelpFormatter)
    r.add_argument("src",
                   help="checkpoint dir, a run's checkpoints/ dir, or a run dir (its latest)")
    r.add_argument("out", help="new directory for the resharded checkpoint")
    r.add_argument("--world-size", type=int, required=True, help="ranks of the new layout")
    r.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the new layout")
    r.add_argument("--ep", type=int, default=1, help="expert-parallel degree of the new layout")
    e = sub.add_parser("export", help="one consolidated safetensors file of the model",
                       formatter_class=HelpFormatter)
    e.add_argument("src",
                   help="checkpoint dir, a run's checkpoints/ dir, or a run dir (its latest)")
    e.add_argument("out", help="output .safetensors file")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default=None,
                   help="cast the weights (default: as saved, float32)")
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if a.cmd == "reshard":
            reshard(a.src, a.out, a.world_size, a.tp, a.ep)
        else:
            export(a.src, a.out, a.dtype)
    except (CheckpointError, ValueError) as err:
        sys.stderr.write(f"checkpoint error: {err}\n")
        return 2
    return 0
