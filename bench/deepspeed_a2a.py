"""DeepSpeed's MoE layer at ep_size 1: does it run its all-to-all, and what would it cost?

Per case (one process, one thread, a 1-rank gloo group as bench/moe_layer.py builds it):
  - torch.profiler over DeepSpeed's forward + backward: calls and self time of its
    `_AllToAll` (forward and backward), and of its dense dispatch/combine einsums;
  - the layer's step time (median of reps);
  - `a2a_1rank_ms`: four 1-rank gloo `all_to_all_single`s of the dispatched [E, C, D]
    tensor (dispatch, combine and their backward twins), i.e. what the layer pays where
    its all-to-all runs at ep_size 1 (DeepSpeed versions without the `ep_size > 1` guard).

    .venv/bin/python bench/deepspeed_a2a.py            # the 3 quick cases, ~1 min
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import moe_common as bench
import torch
import torch.distributed as dist

QUICK = [(4096, 8, 1, 1.25), (4096, 32, 2, 1.0), (4096, 128, 2, None)]


def _median_ms(fn, reps):
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[1:]), 1e3 * min(times[1:])


def _dispatched_shape(ds, x):
    """[E, C, D] of the layer's dispatched input, read off one forward."""
    shapes = []
    hook = ds.deepspeed_moe.experts.register_forward_pre_hook(
        lambda _, args: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        ds(x)
    hook.remove()
    ep, num_local, cap, d = shapes[0]
    return ep * num_local, cap, d


def case(tokens, experts, k, cf, reps):
    torch.manual_seed(0)
    layer = bench.build_dmoe(experts, k, cf)
    ds = bench.build_deepspeed(layer, k, cf, "gelu", torch.float32)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, bench.D_MODEL, generator=gen).requires_grad_()
    grad = torch.randn(1, tokens, bench.D_MODEL, generator=gen)

    def step():
        for p in [x, *ds.parameters()]:
            p.grad = None
        bench.layer_step(ds, x, grad, True)

    step_ms, step_min_ms = _median_ms(step, reps)
    with torch.profiler.profile() as prof:
        step()
    events = {e.key: e for e in prof.key_averages()}
    a2a = [events[n] for n in ("_AllToAll", "_AllToAllBackward") if n in events]
    einsum = events.get("aten::einsum")
    shape = _dispatched_shape(ds, x)
    send = torch.randn(*shape, generator=gen)
    recv = torch.empty_like(send)

    def exchanges():
        for _ in range(4):
            dist.all_to_all_single(recv, send)
    a2a_ms, _ = _median_ms(exchanges, reps)
    return {"tokens": tokens, "experts": experts, "k": k, "cf": "dropless" if cf is None else cf,
            "ep_size": 1, "dispatched_ECD": list(shape), "ds_step_ms": step_ms, "ds_step_min_ms": step_min_ms,
            "alltoall_calls": sum(e.count for e in a2a),
            "alltoall_self_ms": sum(e.self_cpu_time_total for e in a2a) / 1e3,
            "einsum_calls": einsum.count if einsum else 0,
            "einsum_ms": einsum.cpu_time_total / 1e3 if einsum else 0.0,
            "a2a_1rank_ms": a2a_ms, "a2a_1rank_share": a2a_ms / (step_ms + a2a_ms)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    bench.init_deepspeed("gloo")
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed
    rows = []
    for c in QUICK:
        row = case(*c, args.reps)
        row["deepspeed"] = deepspeed.__version__
        print(json.dumps(row), flush=True)
        rows.append(row)
    for r in rows:
        print(f"T={r['tokens']} E={r['experts']} k={r['k']} cf={r['cf']}: DS step {r['ds_step_ms']:.0f} ms, "
              f"_AllToAll calls {r['alltoall_calls']} ({r['alltoall_self_ms']:.1f} ms), einsum "
              f"{r['einsum_ms']:.0f} ms; 4 one-rank exchanges of {r['dispatched_ECD']}: "
              f"{r['a2a_1rank_ms']:.1f} ms ({r['a2a_1rank_share']:.1%} of a step that ran them)",
              file=sys.stderr)


if __name__ == "__main__":
    main()
