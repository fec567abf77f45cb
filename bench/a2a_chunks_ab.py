"""A/B of parallel.a2a_chunks alone: the EP layer's fwd+bwd with 1, 2, 4 chunks.

Forked gloo ranks (tests/_dist.py), the same layer per chunk count (same seed and weights),
each rank its own tokens; the variants interleaved rep by rep in a rotated order, each
call after a barrier; per rep the slowest rank's time (a step ends when it does). Prints
one JSON line per case: per chunk count the median and fastest rep, and per rep the ratio
to 1 chunk (median): moe_layer_ep.py's full comparison is too slow on a busy machine to
resolve a few %.

    .venv/bin/python bench/a2a_chunks_ab.py --ep 2 --experts 8 32 --reps 15
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import moe_common as bench
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmoe.parallel.expert_parallel.apply import shard_moe_layer


def _rank(rank, world, experts, k, cf, tokens, chunks, reps):
    layers = {}
    for c in chunks:
        torch.manual_seed(0)
        layers[c] = shard_moe_layer(bench.build_dmoe(experts, k, cf), chunks=c)
    gen = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(1, tokens, bench.D_MODEL, generator=gen).requires_grad_()
    grad = torch.randn(1, tokens, bench.D_MODEL, generator=gen)
    wall = {c: [] for c in chunks}
    for rep in range(reps + 1):
        shift = rep % len(chunks)
        for c in chunks[shift:] + chunks[:shift]:
            x.grad = None
            for p in layers[c].parameters():
                p.grad = None
            dist.barrier()
            t0 = time.perf_counter()
            bench.layer_step(layers[c], x, grad, False)
            if rep:
                wall[c].append(time.perf_counter() - t0)
    return wall


def main():
    from tests._dist import run_ranks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--cf", default="dropless")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)
    for experts in args.experts:
        per_rank = run_ranks(_rank, args.ep, args=(experts, args.k, bench.parse_cf(args.cf), args.tokens,
                                                   args.chunks, args.reps), timeout=3600)
        slowest = {c: [max(r[c][i] for r in per_rank) for i in range(args.reps)] for c in args.chunks}
        row = {"ep": args.ep, "tokens": args.tokens, "experts": experts, "k": args.k, "cf": args.cf,
               "reps": args.reps}
        for c in args.chunks:
            row[f"c{c}_ms"] = 1e3 * statistics.median(slowest[c])
            row[f"c{c}_min_ms"] = 1e3 * min(slowest[c])
            row[f"c{c}_vs_c1"] = statistics.median(a / b for a, b in zip(slowest[c], slowest[args.chunks[0]]))
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
