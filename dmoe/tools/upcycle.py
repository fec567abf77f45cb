"""`dmoe upcycle DENSE_CHECKPOINT OUT --num-experts E --top-k K [--noise S] [--every N]
[--moe.key=value ...]`: sparse upcycling. Each dense MLP (of every N-th block; default
all) becomes E experts initialised as copies of it (plus Gaussian noise of std S times the
weight's std, if S > 0) under a new router; every other weight is kept.

    dmoe upcycle runs/dense/checkpoints/step_000200 runs/upcycled --num-experts 8 --top-k 2
    python launch/train.py --config runs/upcycled/config.yaml --train.steps=400  # any layout

OUT is a run directory with a 1-rank, parameter-only checkpoint at step 0 (AdamW starts
fresh) and a config whose train.resume is `auto` (dmoe.checkpoint.whole). With top_k > 1
and renormalised gates the upcycled model computes what the dense one did (dropless);
dmoe.model.upcycle says what holds. Errors: one line, exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys

from dmoe.tools.help_format import HelpFormatter, summary


def load_dense(src: str):
    """(config, whole parameters, checkpoint dir) of a checkpoint."""
    from dmoe.checkpoint.offline import open_checkpoint
    from dmoe.config import load_config

    reader = open_checkpoint(src)
    cfg = load_config(reader.dir / "config.yaml", ["--parallel.tp=1", "--parallel.ep=1"])
    return cfg, {n: reader.global_tensor(n, "param") for n in reader.tensors}, reader.dir


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dmoe upcycle", description=summary(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("dense", help="the dense checkpoint (or its run dir)")
    p.add_argument("out", help="new run directory")
    p.add_argument("--num-experts", type=int, required=True, help="experts per MoE layer (E)")
    p.add_argument("--top-k", type=int, required=True, help="experts per token (K)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="Gaussian noise on the copies, x the weight's std")
    p.add_argument("--every", type=int, default=1, help="an MoE FFN every N blocks (moe.every)")
    p.add_argument("--seed", type=int, default=0, help="router init and noise")
    a, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dmoe.checkpoint.errors import CheckpointError
    from dmoe.checkpoint.whole import write_run_dir
    from dmoe.config import ConfigError
    from dmoe.model.upcycle import moe_config, upcycle

    try:
        dense_cfg, tensors, src = load_dense(a.dense)
        cfg = moe_config(dense_cfg, a.num_experts, a.top_k, a.every, overrides)
        moe = upcycle(tensors, cfg, a.noise, a.seed, str(src))
        out = write_run_dir(a.out, cfg, moe, {"upcycled_from": str(src), "noise": a.noise})
    except (CheckpointError, ConfigError, ValueError) as err:
        sys.stderr.write(f"upcycle error: {err}\n")
        return 2
    if a.top_k == 1:
        logging.warning("top_k 1: the gate is the router probability, so the upcycled model "
                        "starts as p * MLP(x), not the dense model")
    sys.stdout.write(f"upcycled {src} -> {out} ({a.num_experts} experts, top-{a.top_k}); "
                     f"train on: python launch/train.py --config {out}/config.yaml\n")
    return 0
