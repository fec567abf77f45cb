"""`dmoe merge DENSE_1 ... DENSE_N OUT [--top-k K] [--every N] [--moe.key=value ...]`:
Branch-Train-MiX. N dense checkpoints of one architecture (e.g. one per domain, trained
in parallel) become one MoE: their MLPs become the N experts of each (every N-th) block,
every other parameter is their mean, and each MoE block gets a new router; training on
the mix then teaches the router.

    dmoe merge runs/code runs/legal runs/reference runs/changelog runs/btx --top-k 2
    python launch/train.py --config runs/btx/config.yaml --train.steps=400   # any layout

The output's config is the first model's, with the MoE section set (num_experts = N), and
the dotted overrides: when each model trained on its own domain, `--data.domains=[]`
(or --data.paths) points the merged model at the mix.
OUT: as `dmoe upcycle` writes it (dmoe.checkpoint.whole). Errors: one line, exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys

from dmoe.tools.help_format import HelpFormatter, summary


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dmoe merge", description=summary(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("paths", nargs="+", help="DENSE_1 ... DENSE_N OUT")
    p.add_argument("--top-k", type=int, default=None, help="default: min(2, N)")
    p.add_argument("--every", type=int, default=1, help="an MoE FFN every N blocks (moe.every)")
    p.add_argument("--seed", type=int, default=0, help="router init")
    a, overrides = p.parse_known_args(argv)
    if len(a.paths) < 3:
        p.error("give at least two dense checkpoints and OUT")
    *sources, out_dir = a.paths
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dmoe.checkpoint.errors import CheckpointError
    from dmoe.checkpoint.whole import write_run_dir
    from dmoe.config import ConfigError
    from dmoe.model.upcycle import merge, moe_config

    from .upcycle import load_dense

    try:
        loaded = [load_dense(s) for s in sources]
        first = loaded[0][0].model
        for cfg, _, src in loaded[1:]:
            diff = [k for k, v in vars(cfg.model).items() if getattr(first, k) != v]
            if diff:
                raise ConfigError(f"{src}: model.{diff[0]} ({getattr(cfg.model, diff[0])}) differs "
                                  f"from {loaded[0][2]} ({getattr(first, diff[0])})")
        n = len(loaded)
        cfg = moe_config(loaded[0][0], n, a.top_k or min(2, n), a.every, overrides)
        if cfg.data == loaded[0][0].data and any(c.data != cfg.data for c, _, _ in loaded[1:]):
            logging.warning("the models were trained on different data (e.g. one domain each); "
                            "the output's data section is the first model's: pass --data.* "
                            "overrides (e.g. --data.domains=[]) to train it on the mix")
        tensors = merge([t for _, t, _ in loaded], cfg, a.seed, [str(s) for _, _, s in loaded])
        out = write_run_dir(out_dir, cfg, tensors, {"merged_from": [str(s) for _, _, s in loaded]})
    except (CheckpointError, ConfigError, ValueError) as err:
        sys.stderr.write(f"merge error: {err}\n")
        return 2
    sys.stdout.write(f"merged {n} dense models -> {out} ({n} experts, top-{cfg.moe.top_k}); "
                     f"train on: python launch/train.py --config {out}/config.yaml\n")
    return 0
