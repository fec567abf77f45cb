"""Does gloo's async all-to-all overlap compute on this CPU? (parallel.a2a_chunks' premise)

Per rank (forked gloo ranks, one compute thread each), interleaved rep by rep, each after a
barrier: `compute` (matmuls of the size of one expert chunk), `a2a` (a blocking
all_to_all_single of [rows, 256] fp32, the EP dispatch of `rows` kept rows), and
`overlapped` (the same all-to-all issued with async_op=True, the compute, then wait()).
Perfect overlap gives overlapped = max(compute, a2a); none gives their sum. Reported:
the slower rank's medians and `hidden` = (compute + a2a - overlapped) / a2a, the share of
the exchange that the overlap hid.

    .venv/bin/python bench/a2a_overlap.py --ranks 2 4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rank(rank, world, rows, reps):
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(rows, 256, generator=gen)
    out = torch.empty_like(x)
    a, w = torch.randn(rows // 2, 256, generator=gen), torch.randn(256, 1024, generator=gen)

    def compute():
        for _ in range(4):
            torch.mm(a, w)

    def a2a():
        dist.all_to_all_single(out, x)

    def overlapped():
        work = dist.all_to_all_single(out, x, async_op=True)
        compute()
        work.wait()

    fns = {"compute": compute, "a2a": a2a, "overlapped": overlapped}
    wall = {n: [] for n in fns}
    for rep in range(reps + 1):
        for name in list(fns)[rep % 3:] + list(fns)[:rep % 3]:
            dist.barrier()
            t0 = time.perf_counter()
            fns[name]()
            if rep:
                wall[name].append(time.perf_counter() - t0)
    return {n: 1e3 * statistics.median(v) for n, v in wall.items()}


def main():
    from tests._dist import run_ranks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)
    for world in args.ranks:
        per_rank = run_ranks(_rank, world, args=(args.rows, args.reps), timeout=600)
        row = {n: max(r[n] for r in per_rank) for n in per_rank[0]}
        row["hidden"] = (row["compute"] + row["a2a"] - row["overlapped"]) / row["a2a"]
        print(json.dumps({"ranks": world, "rows": args.rows, "reps": args.reps,
                          **{k: round(v, 3) for k, v in row.items()}}), flush=True)


if __name__ == "__main__":
    main()
