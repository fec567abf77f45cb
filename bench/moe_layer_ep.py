"""`moe_layer.py --ep 2`: the same forward + backward per case, expert-parallel over gloo ranks.

Shape legend: T tokens per rank, D model dim, E global experts, L local experts (E / ep).

Each rank is a forked process (tests/_dist.py: gloo over a FileStore, one thread). Every
rank builds the same full layer (same seed), then
    dmoe       shard_moe_layer(layer): keeps experts [r*L, (r+1)*L), all-to-all dispatcher
    deepspeed  deepspeed.moe.layer.MoE(..., ep_size=ep) with the same router weights and
               this rank's expert slice copied in (so both route identically)
    limit      the bare expert MLPs on the rows this rank's experts compute (kept rows from
               every rank for my experts), no router, dispatch, combine or communication:
               the faster (by median, per rank) of moe_layer.py's two formulations
    a2a        dmoe's four row all-to-alls alone (dispatch + combine, and their backward
               twins) with this case's splits: what the exchange costs on gloo
    dmoe_c<c>  dmoe with parallel.a2a_chunks = c (DMOE_A2A_CHUNKS, default "2,4"): the
               rows cut into c chunks whose async all-to-alls overlap the experts
    traced     dmoe again under a CommRecorder(measure_wait=True), not timed itself: per
               rep the time spent waiting for the slowest rank (a timed 1-element
               all-reduce before each exchange) and in the exchanges themselves
    reorder    the regrouping of the received rows by local expert and back, with their
               backward scatters, on this case's rows alone
Each rank feeds its own T tokens (different inputs per rank). The callables run
interleaved rep by rep (same rotated order on every rank), each after a barrier, so both
ranks start a step together; a step ends when the slowest rank does, so the table gives
the slower rank's median (and fastest rep). The rep count is agreed over the group.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import statistics
import sys
import time

import moe_common as bench
import torch
import torch.distributed as dist

from dmoe.parallel import comm_trace
from dmoe.parallel.comm_trace import CommRecorder
from dmoe.parallel.expert_parallel.apply import shard_moe_layer

NAMES = ("dmoe", "deepspeed", "limit", "a2a", "reorder")  # limit: the faster of limit_linear, limit_grouped
CHUNKS = [int(c) for c in os.environ.get("DMOE_A2A_CHUNKS", "2,4").split(",") if c]


def _deepspeed_env(rank: int, world: int) -> None:
    # torch.distributed is already up; DeepSpeed asserts LOCAL_RANK is set. No LOCAL_SIZE
    # (it would leave a 66 MB /dev/shm buffer per rank): see test_deepspeed_equivalence.py.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def _a2a_rows(send_splits, recv_splits, gen):
    """Dispatch, combine and their backward twins: four uneven all-to-alls of [N, D] rows."""
    x_send = torch.randn(sum(send_splits), bench.D_MODEL, generator=gen)
    x_recv = torch.empty(sum(recv_splits), bench.D_MODEL)

    def run():
        for _ in range(2):  # forward pair, then the backward pair
            dist.all_to_all_single(x_recv, x_send, recv_splits, send_splits)
            dist.all_to_all_single(x_send, x_recv, send_splits, recv_splits)
    return run


def _reorder_rows(layer, x, training=True):
    """The regroup by local expert (dispatch) and back (combine), and their backward
    scatters, on the rows this rank receives: the reordering the EP path adds."""
    x_TD = x.detach().reshape(-1, x.shape[-1])
    with torch.no_grad():
        x_ND, meta = layer.dispatcher.dispatch(x_TD, layer.router(x_TD), training)
    x_recv, sort_N, unsort_N = x_ND.index_select(0, meta.unsort_N), meta.sort_N, meta.unsort_N

    def run():
        a = x_recv.index_select(0, sort_N)
        b = a.index_select(0, unsort_N)
        g = torch.zeros_like(b).index_add_(0, unsort_N, b)
        torch.zeros_like(a).index_add_(0, sort_N, g)
    return run


def _traced(layer, x, grad, out):
    """One dmoe step under a recorder that times waiting apart from transfer."""
    def run():
        rec = CommRecorder(measure_wait=True)
        with comm_trace.recording(rec):
            rec.start_step(0)
            bench.layer_step(layer, x, grad, False)
            events = rec.end_step()
        out["wait"].append(sum(e.seconds for e in events if e.op == "barrier"))
        out["transfer"].append(sum(e.seconds for e in events if e.op == "all_to_all"))
    return run


def _timed_ep(fns, params, args):
    """Interleaved, barrier before each call; the rep count is agreed over the group."""
    names, wall = list(fns), {n: [] for n in fns}
    reps, r = args.warmup + args.min_reps, 0
    gc.disable()
    try:
        while r < reps:
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                for p in params[name]:
                    p.grad = None
                gc.collect()
                dist.barrier()
                t0 = time.perf_counter()
                fns[name]()
                if r >= args.warmup:
                    wall[name].append(time.perf_counter() - t0)
            if r == args.warmup:
                slowest = torch.tensor(sum(w[-1] for w in wall.values()))
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                extra = min(args.max_reps, math.ceil(args.budget / float(slowest)))
                reps = args.warmup + max(args.min_reps, extra)
            r += 1
    finally:
        gc.enable()
    return wall


def _case(rank, world, args, tokens, experts, k, cf, d_ff, seed=0):
    torch.manual_seed(seed)
    dtype = bench.DTYPES[args.expert_dtype]
    layer = bench.build_dmoe(experts, k, cf, d_ff, args.activation, args.expert_dtype)
    num_local = experts // world
    ds = bench.build_deepspeed(layer, k, cf, args.activation, dtype, ep_size=world,
                               first_expert=rank * num_local)
    chunked = {}
    for c in CHUNKS:  # the same weights (same seed), exchanges overlapped in c chunks
        torch.manual_seed(seed)
        chunked[c] = shard_moe_layer(
            bench.build_dmoe(experts, k, cf, d_ff, args.activation, args.expert_dtype), chunks=c)
    shard_moe_layer(layer)
    gen = torch.Generator().manual_seed(seed + 1 + rank)  # each rank its own tokens
    x = torch.randn(1, tokens, bench.D_MODEL, generator=gen).requires_grad_()
    grad = torch.randn(1, tokens, bench.D_MODEL, generator=gen)

    y, stats = layer(x)  # also a check: same routing and weights as DeepSpeed
    with torch.no_grad():
        diff = (y - ds(x)[0]).abs().max().item()
    kept_E = stats.kept_E.clone()
    sent = kept_E.reshape(world, num_local).sum(1)
    dist.all_reduce(kept_E)  # rows for expert e from every rank
    counts = kept_E[rank * num_local:(rank + 1) * num_local].tolist()
    recv = torch.empty_like(sent)
    dist.all_to_all_single(recv, sent)
    limit = bench.Limit(layer, counts, args.activation, dtype, gen)
    trace = {"wait": [], "transfer": []}
    fns = {"dmoe": lambda: bench.layer_step(layer, x, grad, False),
           "deepspeed": lambda: bench.layer_step(ds, x, grad, True),
           "limit_linear": limit.linear_loop, "limit_grouped": limit.grouped,
           "a2a": _a2a_rows(sent.tolist(), recv.tolist(), gen),
           "reorder": _reorder_rows(layer, x), "traced": _traced(layer, x, grad, trace),
           **{f"dmoe_c{c}": (lambda m=m: bench.layer_step(m, x, grad, False)) for c, m in chunked.items()}}
    params = {"dmoe": [x, *layer.parameters()], "deepspeed": [x, *ds.parameters()],
              "limit_linear": limit.params(), "limit_grouped": limit.params(), "a2a": [],
              "reorder": [], "traced": [x, *layer.parameters()],
              **{f"dmoe_c{c}": [x, *m.parameters()] for c, m in chunked.items()}}
    wall = _timed_ep(fns, params, args)
    wall.pop("traced")
    chunk_names = [f"dmoe_c{c}" for c in CHUNKS]
    limit_name = min(("limit_linear", "limit_grouped"), key=lambda n: statistics.median(wall[n]))
    wall["limit"] = wall.pop(limit_name)
    mine = dict(rank=rank, rows=sum(counts), sent=sent.tolist(), ds_max_abs_diff=diff,
                limit_formulation=limit_name[6:],
                capacity=stats.capacity, dmoe_impl=layer.experts.resolve_impl(limit.x, counts),
                **{f"{n}_ms": 1e3 * statistics.median(wall[n]) for n in (*NAMES, *chunk_names)},
                **{f"{n}_min_ms": 1e3 * min(wall[n]) for n in (*NAMES, *chunk_names)},
                **{f"{n}_ms": 1e3 * statistics.median(v[args.warmup:] or v) for n, v in trace.items()})
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    row = {"tokens": tokens, "experts": experts, "k": k, "cf": "dropless" if cf is None else cf,
           "ep": world, "d_ff": d_ff, "activation": args.activation, "expert_dtype": args.expert_dtype,
           "reps": len(wall["dmoe"]), "threads": torch.get_num_threads(),
           "malloc": "caching" if os.environ.get("MALLOC_MMAP_MAX_") == "0" else "system",
           "rows": [m["rows"] for m in ranks], "dmoe_impls": [m["dmoe_impl"] for m in ranks],
           "ds_max_abs_diff": max(m["ds_max_abs_diff"] for m in ranks), "per_rank": ranks}
    for n in (*NAMES, *chunk_names):  # a step ends when the slowest rank does
        row[f"{n}_ms"] = max(m[f"{n}_ms"] for m in ranks)
        row[f"{n}_min_ms"] = max(m[f"{n}_min_ms"] for m in ranks)
    # waiting happens on the faster rank(s): the largest wait is the imbalance; transfer
    # as the slowest rank saw it
    row["wait_ms"] = max(m["wait_ms"] for m in ranks)
    row["transfer_ms"] = max(m["transfer_ms"] for m in ranks)
    row["dmoe_speedup_vs_ds"] = row["deepspeed_ms"] / row["dmoe_ms"]
    row["dmoe_overhead"] = row["dmoe_ms"] / row["limit_ms"]
    row["dmoe_overhead_min"] = row["dmoe_min_ms"] / row["limit_min_ms"]
    for n in chunk_names:
        row[f"{n}_overhead"] = row[f"{n}_ms"] / row["limit_ms"]
        row[f"{n}_overhead_min"] = row[f"{n}_min_ms"] / row["limit_min_ms"]
    return row


def _rank_main(rank, world, args, cases):
    _deepspeed_env(rank, world)
    rows = []
    for case in cases:  # moe_layer.Case; the shared expert is not run expert-parallel
        rows.append(_case(rank, world, args, case.tokens, case.experts, case.k,
                          bench.parse_cf(case.cf), case.d_ff))
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run(args, cases):
    """Fork args.ep ranks, run every case in them; returns rank 0's rows."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests._dist import run_ranks

    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401  (once in the parent: ranks fork with it)
    return run_ranks(_rank_main, args.ep, args=(args, cases), timeout=6 * 3600)[0]


def print_table(rows, file=sys.stderr):
    ffn = any(r.get("d_ff", bench.D_FF) != bench.D_FF for r in rows)  # column only off the grid's
    chunk_names = sorted({k[:-len("_overhead")] for r in rows for k in r
                          if k.startswith("dmoe_c") and k.endswith("_overhead")})
    extra = [n for n in ("reorder", "wait", "transfer") if all(f"{n}_ms" in r for r in rows)]
    head = ["EP", "T/rank", "E", "k", "cf"] + (["ffn"] if ffn else []) + [
        "rows per rank", "dmoe ms", "DS ms", "limit ms", "a2a ms"] + [f"{n} ms" for n in extra] + [
        "dmoe/DS", "dmoe/limit", "dmoe/limit (min)"] + [
        f"{n[5:]}/limit (min)" for n in chunk_names if all(f"{n}_overhead" in r for r in rows)]
    lines = [head]
    for r in rows:
        lines.append([str(r.get("ep", 2)), str(r["tokens"]), str(r["experts"]), str(r["k"]), str(r["cf"])]
                     + ([str(r.get("d_ff", bench.D_FF))] if ffn else [])
                     + ["/".join(map(str, r["rows"]))]
                     + [f"{r[f'{n}_ms']:.0f}" for n in ("dmoe", "deepspeed", "limit", "a2a", *extra)]
                     + [f"{r['dmoe_speedup_vs_ds']:.2f}x", f"{r['dmoe_overhead']:.3f}",
                        f"{r['dmoe_overhead_min']:.3f}"]
                     + [f"{r[f'{n}_overhead']:.3f} ({r[f'{n}_overhead_min']:.3f})"
                        for n in chunk_names if all(f"{n}_overhead" in q for q in rows)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)), file=file)
