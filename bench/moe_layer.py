"""Forward+backward of one MoE layer: dmoe against deepspeed.moe.layer.MoE and the "limit".

    .venv/bin/python bench/moe_layer.py --quick               # 3 cases, a few minutes
    nice .venv/bin/python bench/moe_layer.py > grid.jsonl     # the full grid (48 cases)
    .venv/bin/python bench/moe_layer.py --quick --impls fused,loop,torch_grouped_mm
    .venv/bin/python bench/moe_layer.py --quick --expert-dtype bfloat16 --activation swiglu
    .venv/bin/python bench/moe_layer.py --profile --tokens 4096 --experts 128 --k 2
    .venv/bin/python bench/moe_layer.py --ep 2 --tokens 4096 --experts 8 32 --cf 1.25 dropless

One JSON line per case on stdout, a readable table at the end (stderr). Every
implementation is timed in the same process, one thread, interleaved rep by rep (the
order rotates), after a warm-up; figures are medians. "limit" is the same expert MLPs on
exactly the rows dmoe's experts compute (all T*k routed rows when dropless, the kept rows
otherwise), without router, dispatch or combine: the faster of a per-expert F.linear loop
and one torch._grouped_mm per matmul. Peak memory is the high-water mark of live torch
CPU tensor bytes during one step, above what was live when it began (parameters and
inputs excluded, gradients included), from the profiler's allocation records.
--ep 2 runs each case expert-parallel over two forked gloo ranks (bench/moe_layer_ep.py).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_common import (  # noqa: E402  (bench/ is on sys.path: the script's directory)
    D_FF,
    D_MODEL,
    DTYPES,
    MIN_CAPACITY,
    Limit,
    build_deepspeed,
    init_deepspeed,
    layer_step,
    parse_cf,
)

from dmoe.moe.dispatcher import CapacitySettings  # noqa: E402
from dmoe.moe.layer import MoELayer  # noqa: E402

# glibc by default mmaps blocks over 32 MiB and returns them on free, so every step page-faults
# its big tensors back in (measured 20-40% of a step as kernel time, varying run to run).
# These keep freed memory in the process, as a caching allocator would; the bench re-executes
# itself with them unless --system-malloc.
CACHING_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
                  "MALLOC_TOP_PAD_": str(256 << 20)}


def timed(fns: dict, params: dict, warmup: int, budget_s: float, min_reps: int, max_reps: int):
    """Interleave the callables rep by rep (rotating order): median wall, median CPU, min wall."""
    names, wall, cpu = list(fns), {n: [] for n in fns}, {n: [] for n in fns}
    reps, r = warmup + min_reps, 0
    gc.disable()
    try:
        while r < reps:
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                for p in params[name]:
                    p.grad = None
                gc.collect()
                t0, c0 = time.perf_counter(), time.process_time()
                fns[name]()
                if r >= warmup:
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
            if r == warmup:  # size the run from the first measured rep
                slowest = max(w[-1] for w in wall.values()) * len(names)
                reps = warmup + max(min_reps, min(max_reps, math.ceil(budget_s / slowest)))
            r += 1
    finally:
        gc.enable()
    return ({n: statistics.median(v) for n, v in wall.items()},
            {n: statistics.median(v) for n, v in cpu.items()},
            {n: min(v) for n, v in wall.items()}, reps - warmup)


def peak_bytes(fn, params) -> int:
    """High-water mark of live CPU tensor bytes during fn() above the level at its start."""
    from torch.profiler import ProfilerActivity, profile

    for p in params:
        p.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(records, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def run_case(args, tokens, experts, k, cf, seed=0):
    torch.manual_seed(seed)
    dtype = DTYPES[args.expert_dtype]
    gen = torch.Generator().manual_seed(seed + 1)
    layers = {}
    for impl in args.impls:
        torch.manual_seed(seed)  # identical weights for every dmoe variant
        layer = MoELayer(D_MODEL, experts, k, D_FF, CapacitySettings(cf, cf, MIN_CAPACITY, "position"),
                         activation=args.activation, expert_dtype=args.expert_dtype)
        layer.experts.impl = impl
        layers[f"dmoe_{impl}" if len(args.impls) > 1 else "dmoe"] = layer
    first = next(iter(layers.values()))
    x = torch.randn(1, tokens, D_MODEL, generator=gen).requires_grad_()
    grad = torch.randn(1, tokens, D_MODEL, generator=gen)

    _, stats = first(x)
    kept = stats.kept_E.tolist()
    limit = Limit(first, kept, args.activation, dtype, gen)
    fns, params = {}, {}
    for name, layer in layers.items():
        fns[name] = lambda layer=layer: layer_step(layer, x, grad, False)
        params[name] = [x, *layer.parameters()]
    ds = None
    if not args.no_deepspeed:
        ds = build_deepspeed(first, k, cf, args.activation, dtype)
        fns["deepspeed"] = lambda: layer_step(ds, x, grad, True)
        params["deepspeed"] = [x, *ds.parameters()]
    fns["limit_linear"], params["limit_linear"] = limit.linear_loop, limit.params()
    fns["limit_grouped"], params["limit_grouped"] = limit.grouped, limit.params()

    wall, cpu, fastest, reps = timed(fns, params, args.warmup, args.budget, args.min_reps, args.max_reps)
    row = dict(tokens=tokens, experts=experts, k=k, cf=cf if cf is not None else "dropless",
               activation=args.activation, expert_dtype=args.expert_dtype, reps=reps,
               kept_rows=sum(kept), routed_rows=tokens * k, capacity=stats.capacity,
               threads=torch.get_num_threads(),
               malloc="caching" if os.environ.get("MALLOC_MMAP_MAX_") == "0" else "system")
    limit_name = min(("limit_linear", "limit_grouped"), key=wall.get)
    row["dmoe_impls"] = [layer.experts.resolve_impl(limit.x, kept) for layer in layers.values()]
    row["limit_ms"], row["limit_formulation"] = 1e3 * wall[limit_name], limit_name[6:]
    row["limit_cpu_ms"] = 1e3 * min(cpu["limit_linear"], cpu["limit_grouped"])
    for name in fns:
        if name.startswith("limit"):
            row[f"{name}_ms"] = 1e3 * wall[name]
            continue
        row[f"{name}_ms"], row[f"{name}_cpu_ms"] = 1e3 * wall[name], 1e3 * cpu[name]
        row[f"{name}_min_ms"] = 1e3 * fastest[name]
        row[f"{name}_tok_s"] = tokens / wall[name]
        if not args.no_memory:
            row[f"{name}_peak_mib"] = peak_bytes(fns[name], params[name]) / 2**20
        if name.startswith("dmoe"):
            row[f"{name}_overhead"] = wall[name] / wall[limit_name]
            row[f"{name}_overhead_cpu"] = cpu[name] / min(cpu["limit_linear"], cpu["limit_grouped"])
            row[f"{name}_overhead_min"] = fastest[name] / min(fastest["limit_linear"], fastest["limit_grouped"])
            if ds is not None:
                row[f"{name}_speedup_vs_ds"] = wall["deepspeed"] / wall[name]
    if not args.no_memory:
        row["limit_peak_mib"] = peak_bytes(fns[limit_name], params[limit_name]) / 2**20
    if ds is not None:
        with torch.no_grad():  # same routing and weights: dropless outputs must agree
            row["ds_max_abs_diff"] = (first(x)[0] - ds(x)[0]).abs().max().item()
    return row


def profile_case(args):
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    cf = parse_cf(args.cf[0])
    layer = MoELayer(D_MODEL, args.experts[0], args.k[0], D_FF,
                     CapacitySettings(cf, cf, MIN_CAPACITY, "position"), activation=args.activation,
                     expert_dtype=args.expert_dtype)
    x = torch.randn(1, args.tokens[0], D_MODEL).requires_grad_()
    grad = torch.randn_like(x)
    params = [x, *layer.parameters()]
    for _ in range(2):
        for p in params:
            p.grad = None
        layer_step(layer, x, grad, False)
    for p in params:
        p.grad = None
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        layer_step(layer, x, grad, False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def print_table(rows, impls, file=sys.stderr):
    dm = [f"dmoe_{i}" if len(impls) > 1 else "dmoe" for i in impls]
    head = ["T", "E", "k", "cf", "rows"] + [f"{n} ms" for n in dm] + ["DS ms", "limit ms"]
    head += [f"{n} tok/s" for n in dm] + [f"{n}/DS" for n in dm] + [f"{n}/limit" for n in dm]
    head += [f"{n}/limit (min)" for n in dm]
    head += [f"{n} MiB" for n in dm] + ["DS MiB", "limit MiB"]
    lines = [head]
    for r in rows:
        get = lambda key, fmt="{:.0f}": fmt.format(r[key]) if key in r else "-"  # noqa: E731
        line = [str(r["tokens"]), str(r["experts"]), str(r["k"]), str(r["cf"]), str(r["kept_rows"])]
        line += [get(f"{n}_ms") for n in dm] + [get("deepspeed_ms"), get("limit_ms")]
        line += [get(f"{n}_tok_s") for n in dm]
        line += [get(f"{n}_speedup_vs_ds", "{:.2f}x") for n in dm]
        line += [get(f"{n}_overhead", "{:.3f}") for n in dm]
        line += [get(f"{n}_overhead_min", "{:.3f}") for n in dm]
        line += [get(f"{n}_peak_mib") for n in dm] + [get("deepspeed_peak_mib"), get("limit_peak_mib")]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)), file=file)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cf", nargs="+", default=["1.0", "1.25", "2.0", "dropless"])
    p.add_argument("--quick", action="store_true", help="3 cases at 4096 tokens")
    p.add_argument("--impls", default="auto",
                   help="dmoe expert formulations, comma separated: auto, fused, loop, torch_grouped_mm")
    p.add_argument("--activation", default="gelu", choices=["gelu", "swiglu"])
    p.add_argument("--expert-dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=15)
    p.add_argument("--budget", type=float, default=8.0, help="seconds of timing per case")
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of dmoe's step")
    p.add_argument("--table", metavar="JSONL", help="only print the table of a saved run")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel ranks (forked, gloo); --tokens is then per rank")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default (returns big blocks to the OS: page faults every step)")
    args = p.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            rows = [json.loads(line) for line in f if line.startswith("{")]
        if rows[0].get("ep", 1) > 1:
            import moe_layer_ep

            return moe_layer_ep.print_table(rows, sys.stdout)
        impls = [k[5:-6] for k in rows[0] if k.startswith("dmoe_") and k.endswith("_tok_s")]
        return print_table(rows, impls or ["auto"], sys.stdout)
    if not args.system_malloc and os.environ.get("MALLOC_MMAP_MAX_") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CACHING_MALLOC})
    args.impls = args.impls.split(",")
    if args.ep > 1 and (args.impls != ["auto"] or args.no_deepspeed or args.profile):
        p.error("--ep > 1 runs dmoe (impl auto), DeepSpeed, the limit and the all-to-all alone")
    torch.set_num_threads(1)
    if args.profile:
        return profile_case(args)
    if args.quick:
        cases = [(4096, 8, 1, "1.25"), (4096, 32, 2, "1.0"), (4096, 128, 2, "dropless")]
    else:
        cases = list(itertools.product(args.tokens, args.experts, args.k, args.cf))
    if args.ep > 1:
        import moe_layer_ep

        return moe_layer_ep.print_table(moe_layer_ep.run(args, cases))
    if not args.no_deepspeed:
        init_deepspeed()
    rows = []
    for tokens, experts, k, cf in cases:
        rows.append(run_case(args, tokens, experts, k, parse_cf(cf)))
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows, args.impls)


if __name__ == "__main__":
    main()
