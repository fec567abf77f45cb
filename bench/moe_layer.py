"""Forward+backward of one MoE layer: dmoe against DeepSpeed's and torchtitan's MoE layers and the "limit".

    .venv/bin/python bench/moe_layer.py --quick               # 3 cases, a few minutes
    nice .venv/bin/python bench/moe_layer.py > grid.jsonl     # the full grid (48 cases)
    .venv/bin/python bench/moe_layer.py --quick --impls fused,loop,torch_grouped_mm
    .venv/bin/python bench/moe_layer.py --quick --expert-dtype bfloat16 --activation swiglu
    .venv/bin/python bench/moe_layer.py --profile --tokens 4096 --experts 128 --k 2
    .venv/bin/python bench/moe_layer.py --ep 2 --tokens 4096 --experts 8 32 --cf 1.25 dropless
    .venv/bin/python bench/moe_layer.py --fine-grained        # E 64/128, k 6/8, ffn 256 (8 cases)
    .venv/bin/python bench/moe_layer.py --shared              # the same plus a shared expert
    .venv/bin/python bench/moe_layer.py --device cuda --quick # everything on the GPU
    bash bench/install_peers.sh                               # torchtitan 0.3.0 -> .venv/peers

One JSON line per case on stdout, a readable table at the end (stderr). Every
implementation is timed in the same process, one thread, interleaved rep by rep (the
order rotates), after a warm-up; figures are medians. "limit" is the same expert MLPs on
exactly the rows dmoe's experts compute (all T*k routed rows when dropless, the kept rows
otherwise), without router, dispatch or combine: the faster of a per-expert F.linear loop
and one torch._grouped_mm per matmul. Peak memory is the high-water mark of live torch
CPU tensor bytes during one step, above what was live when it began (parameters and
inputs excluded, gradients included), from the profiler's allocation records.
--ep 2 runs each case expert-parallel over two forked gloo ranks (bench/moe_layer_ep.py).

Peers: DeepSpeed's MoE (a dmoe dependency) and torchtitan 0.3.0's (benchmark only, from
bench/install_peers.sh; skipped with one line when absent, or with --no-torchtitan), both
given dmoe's router and expert weights. torchtitan's experts run dmoe's GELU MLP in fp32
through its own torch._grouped_mm calls (so it runs only with the default GELU, float32
experts, and not with --shared); it has no capacity, so it runs every case dropless.
--device cuda: layers, inputs and the limit on the GPU, torch.cuda.synchronize around every
timed rep, peak memory from torch.cuda.max_memory_allocated; DeepSpeed on a 1-rank NCCL
group; a peer that raises there is dropped from the case (its error in the JSON line).

Case sets: the grid (tokens x experts x k x cf, expert ffn D_FF = 1024); --quick (3 grid
cases); --fine-grained (T 4096, E {64, 128}, k {6, 8}, cf {1.25, dropless}, expert ffn
FINE_D_FF = 256, so k=8 does the grid's k=2 expert FLOPs per token); --shared (the
fine-grained cases, or the --quick ones with --quick, plus an always-on shared MLP of
width 2 x the expert ffn beside the experts: dmoe's SharedExpert, DeepSpeed's layer plus a
separate MLP of the same weights, the limit plus the shared MLP's GEMMs).
--tokens/--experts/--k/--cf narrow or replace the chosen set's values.
Where the installed DeepSpeed cannot express a case (top-k beyond 2 before its
topkgating), its figures are null and "deepspeed_note" says why.
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
from typing import NamedTuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_common import (  # noqa: E402  (bench/ is on sys.path: the script's directory)
    D_FF,
    D_MODEL,
    DTYPES,
    Limit,
    WithShared,
    build_deepspeed,
    build_dmoe,
    build_shared,
    build_torchtitan,
    deepspeed_gating,
    init_deepspeed,
    layer_step,
    parse_cf,
    peak_live_bytes,
    saved_bytes,
)

# glibc by default mmaps blocks over 32 MiB and returns them on free, so every step page-faults
# its big tensors back in (measured 20-40% of a step as kernel time, varying run to run).
# These keep freed memory in the process, as a caching allocator would; the bench re-executes
# itself with them unless --system-malloc.
CACHING_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
                  "MALLOC_TOP_PAD_": str(256 << 20)}

# Case sets: values of --tokens/--experts/--k/--cf when not given.
GRID = dict(tokens=[4096, 16384], experts=[8, 32, 128], k=[1, 2], cf=["1.0", "1.25", "2.0", "dropless"])
FINE = dict(tokens=[4096], experts=[64, 128], k=[6, 8], cf=["1.25", "dropless"])
QUICK = [(4096, 8, 1, "1.25"), (4096, 32, 2, "1.0"), (4096, 128, 2, "dropless")]
# Fine-grained expert width: k=8 x 256 = 2 x 1024, the grid's k=2 expert FLOPs per token
# (k=6: 3/4 of them).
FINE_D_FF = 256


class Case(NamedTuple):
    tokens: int
    experts: int
    k: int
    cf: str  # as on the command line: "1.25", "dropless"
    d_ff: int = D_FF
    shared_ff: int | None = None  # width of the shared expert's MLP, None: no shared expert


def timed(fns: dict, params: dict, warmup: int, budget_s: float, min_reps: int, max_reps: int,
          sync=lambda: None):
    """Interleave the callables rep by rep (rotating order): median wall, median CPU, min wall.

    sync() runs before the clock starts and before it stops (CUDA: torch.cuda.synchronize,
    so a rep's wall time covers its kernels, not just their launch)."""
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
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                fns[name]()
                sync()
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


def peak_bytes(fn, params, device: torch.device) -> int:
    """High-water mark of live tensor bytes during fn() above the level at its start, its
    params' grads cleared first: CPU from the profiler's allocation records, CUDA from
    torch.cuda.max_memory_allocated."""
    for p in params:
        p.grad = None
    if device.type != "cuda":
        return peak_live_bytes(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def probe_peers(fns: dict, params: dict, device: torch.device) -> dict:
    """Off the CPU (where every peer is known to run), one untimed call of each peer and
    limit formulation; one that raises is dropped from the case with its error in the JSON
    line (e.g. a torch._grouped_mm the device's kernels do not take). dmoe must run."""
    errors = {}
    if device.type == "cpu":
        return errors
    for name in [n for n in fns if not n.startswith("dmoe")]:
        for p in params[name]:
            p.grad = None
        try:
            fns[name]()
        except Exception as e:  # noqa: BLE001  (a peer's failure is data, not fatal)
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"{name}: dropped from this case ({errors[name]})", file=sys.stderr)
            del fns[name], params[name]
    if "limit_linear" not in fns and "limit_grouped" not in fns:
        raise RuntimeError(f"no limit formulation ran on {device}: {errors}")
    return errors


def run_case(args, case: Case, seed=0):
    tokens, experts, k, cf = case.tokens, case.experts, case.k, parse_cf(case.cf)
    torch.manual_seed(seed)
    dtype = DTYPES[args.expert_dtype]
    gen = torch.Generator().manual_seed(seed + 1)  # CPU: the same values on every device
    dev = torch.device(args.device)
    layers = {}
    shared = ds_shared = None
    for impl in args.impls:
        torch.manual_seed(seed)  # identical weights for every dmoe variant
        layer = build_dmoe(experts, k, cf, case.d_ff, args.activation, args.expert_dtype)
        layer.experts.impl = impl
        if case.shared_ff:
            shared, ds_shared = build_shared(case.shared_ff, args.activation)  # same seed: same weights
            layer = WithShared(layer, shared)
        layers[f"dmoe_{impl}" if len(args.impls) > 1 else "dmoe"] = layer.to(dev)
    first = next(iter(layers.values()))
    first_moe = first.moe if case.shared_ff else first
    x = torch.randn(1, tokens, D_MODEL, generator=gen).to(dev).requires_grad_()
    grad = torch.randn(1, tokens, D_MODEL, generator=gen).to(dev)

    _, stats = first(x)
    kept = stats.kept_E.tolist()
    limit = Limit(first_moe, kept, args.activation, dtype, gen, shared, tokens, dev)
    fns, params = {}, {}
    for name, layer in layers.items():
        fns[name] = lambda layer=layer: layer_step(layer, x, grad, False)
        params[name] = [x, *layer.parameters()]
    ds = None
    gating = None if args.no_deepspeed else deepspeed_gating(k)
    if gating is not None:
        ds = build_deepspeed(first_moe, k, cf, args.activation, dtype)
        if case.shared_ff:
            ds = WithShared(ds, ds_shared)
        ds = ds.to(dev)
        fns["deepspeed"] = lambda: layer_step(ds, x, grad, True)
        params["deepspeed"] = [x, *ds.parameters()]
    titan = None
    # its experts are given dmoe's GELU MLP in fp32 only (see moe_common.build_torchtitan)
    if (not args.no_torchtitan and not case.shared_ff and args.activation == "gelu"
            and args.expert_dtype == "float32"):
        titan = build_torchtitan(first_moe, k)
    if titan is not None:
        fns["torchtitan"] = lambda: layer_step(titan, x, grad, "titan")
        params["torchtitan"] = [x, *titan.parameters()]
    fns["limit_linear"], params["limit_linear"] = limit.linear_loop, limit.params()
    fns["limit_grouped"], params["limit_grouped"] = limit.grouped, limit.params()

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    errors = probe_peers(fns, params, dev)
    if "deepspeed" in errors:
        ds = None
    if "torchtitan" in errors:
        titan = None
    limits = [n for n in ("limit_linear", "limit_grouped") if n in fns]
    wall, cpu, fastest, reps = timed(fns, params, args.warmup, args.budget, args.min_reps,
                                     args.max_reps, sync)
    row = dict(tokens=tokens, experts=experts, k=k, cf=cf if cf is not None else "dropless",
               d_ff=case.d_ff, shared_ff=case.shared_ff,
               activation=args.activation, expert_dtype=args.expert_dtype, reps=reps,
               kept_rows=sum(kept), routed_rows=tokens * k, capacity=stats.capacity,
               threads=torch.get_num_threads(), device=str(dev),
               malloc="caching" if os.environ.get("MALLOC_MMAP_MAX_") == "0" else "system")
    row.update({f"{name}_error": text for name, text in errors.items()})
    limit_name = min(limits, key=wall.get)
    row["dmoe_impls"] = [(lay.moe if case.shared_ff else lay).experts.resolve_impl(limit.x, kept)
                         for lay in layers.values()]
    if not args.no_deepspeed:
        row["deepspeed_gating"] = gating
        note = deepspeed_note(k, cf, gating)
        if note:
            row["deepspeed_note"] = note
        if ds is None:  # DeepSpeed cannot express the case: its figures are null
            row.update(deepspeed_ms=None, deepspeed_cpu_ms=None, deepspeed_min_ms=None,
                       deepspeed_tok_s=None, ds_max_abs_diff=None)
    row["limit_ms"], row["limit_formulation"] = 1e3 * wall[limit_name], limit_name[6:]
    row["limit_cpu_ms"] = 1e3 * min(cpu[n] for n in limits)
    for name in fns:
        if name.startswith("limit"):
            row[f"{name}_ms"] = 1e3 * wall[name]
            continue
        row[f"{name}_ms"], row[f"{name}_cpu_ms"] = 1e3 * wall[name], 1e3 * cpu[name]
        row[f"{name}_min_ms"] = 1e3 * fastest[name]
        row[f"{name}_tok_s"] = tokens / wall[name]
        if not args.no_memory:
            row[f"{name}_peak_mib"] = peak_bytes(fns[name], params[name], dev) / 2**20
            row[f"{name}_saved_mib"] = saved_bytes(fns[name], params[name]) / 2**20
        if name.startswith("dmoe"):
            row[f"{name}_overhead"] = wall[name] / wall[limit_name]
            row[f"{name}_overhead_cpu"] = cpu[name] / min(cpu[n] for n in limits)
            row[f"{name}_overhead_min"] = fastest[name] / min(fastest[n] for n in limits)
            if titan is not None:
                row[f"{name}_speedup_vs_titan"] = wall["torchtitan"] / wall[name]
                row[f"{name}_speedup_vs_titan_min"] = fastest["torchtitan"] / fastest[name]
                row[f"{name}_speedup_vs_titan_cpu"] = cpu["torchtitan"] / cpu[name]
            if ds is not None:
                row[f"{name}_speedup_vs_ds"] = wall["deepspeed"] / wall[name]
                row[f"{name}_speedup_vs_ds_cpu"] = cpu["deepspeed"] / cpu[name]
            elif not args.no_deepspeed:
                row[f"{name}_speedup_vs_ds"] = None
    if not args.no_memory:
        row["limit_peak_mib"] = peak_bytes(fns[limit_name], params[limit_name], dev) / 2**20
        if ds is None and not args.no_deepspeed:
            row["deepspeed_peak_mib"] = None
    if ds is not None:
        with torch.no_grad():  # same routing and weights: dropless outputs must agree
            row["ds_max_abs_diff"] = (first(x)[0] - ds(x)[0]).abs().max().item()
    if titan is not None:
        with torch.no_grad():  # same routing and weights; torchtitan never drops
            row["titan_max_abs_diff"] = (first(x)[0] - titan(x)).abs().max().item()
    return row


def deepspeed_note(k, cf, gating):
    """What keeps DeepSpeed from the case, or from computing the same thing as dmoe in it."""
    if gating is None:
        import deepspeed

        return f"k={k} not supported (deepspeed {deepspeed.__version__}: top-1/top-2 gating only)"
    if gating == "topkgating" and cf is not None:
        return ("topkgating drops by gate value (drop_policy 'probs', not settable through MoE), "
                "dmoe by position")
    return None


def profile_case(args):
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    cf = parse_cf(args.cf[0])
    layer = build_dmoe(args.experts[0], args.k[0], cf, args.d_ff, args.activation, args.expert_dtype)
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
    # expert ffn and shared-expert columns only where a row leaves the grid's (old runs print as before)
    ffn = any(r.get("d_ff", D_FF) != D_FF or r.get("shared_ff") for r in rows)
    head = ["T", "E", "k", "cf"] + (["ffn", "shared"] if ffn else []) + ["rows"]
    titan = any("torchtitan_ms" in r for r in rows)  # runs before it had none: as before
    tt = ["TT ms"] if titan else []
    head += [f"{n} ms" for n in dm] + ["DS ms"] + tt + ["limit ms"]
    head += [f"{n} tok/s" for n in dm] + [f"{n}/DS" for n in dm]
    head += [f"{n}/TT" for n in dm] + [f"{n}/TT (min)" for n in dm] if titan else []
    head += [f"{n}/limit" for n in dm] + [f"{n}/limit (min)" for n in dm]
    head += [f"{n} MiB" for n in dm] + ["DS MiB"] + (["TT MiB"] if titan else []) + ["limit MiB"]
    lines, notes = [head], {}
    for r in rows:
        def get(key, fmt="{:.0f}"):
            if key not in r:
                return "-"
            return "n/a" if r[key] is None else fmt.format(r[key])
        line = [str(r["tokens"]), str(r["experts"]), str(r["k"]), str(r["cf"])]
        if ffn:
            line += [str(r.get("d_ff", D_FF)), str(r.get("shared_ff") or "-")]
        line += [str(r["kept_rows"])]
        if r.get("deepspeed_note"):
            notes.setdefault(r["deepspeed_note"], []).append(f"E={r['experts']} k={r['k']} cf={r['cf']}")
        line += [get(f"{n}_ms") for n in dm] + [get("deepspeed_ms")]
        line += [get("torchtitan_ms")] if titan else []
        line += [get("limit_ms")] + [get(f"{n}_tok_s") for n in dm]
        line += [get(f"{n}_speedup_vs_ds", "{:.2f}x") for n in dm]
        if titan:
            line += [get(f"{n}_speedup_vs_titan", "{:.2f}x") for n in dm]
            line += [get(f"{n}_speedup_vs_titan_min", "{:.2f}x") for n in dm]
        line += [get(f"{n}_overhead", "{:.3f}") for n in dm]
        line += [get(f"{n}_overhead_min", "{:.3f}") for n in dm]
        line += [get(f"{n}_peak_mib") for n in dm] + [get("deepspeed_peak_mib")]
        line += [get("torchtitan_peak_mib")] if titan else []
        line += [get("limit_peak_mib")]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)), file=file)
    for note, where in notes.items():
        print(f"DeepSpeed ({', '.join(where)}): {note}", file=file)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", help=f"default {GRID['tokens']}")
    p.add_argument("--experts", type=int, nargs="+", help=f"default {GRID['experts']}")
    p.add_argument("--k", type=int, nargs="+", help=f"default {GRID['k']}")
    p.add_argument("--cf", nargs="+", help=f"default {GRID['cf']}")
    sets = p.add_mutually_exclusive_group()
    sets.add_argument("--quick", action="store_true", help="3 cases at 4096 tokens")
    sets.add_argument("--fine-grained", action="store_true",
                      help=f"tokens {FINE['tokens']} x experts {FINE['experts']} x k {FINE['k']} x "
                           f"cf {FINE['cf']}, expert ffn {FINE_D_FF}")
    p.add_argument("--shared", action="store_true",
                   help="add a shared expert (always-on MLP, width --shared-ff) to every case; "
                        "without --quick it runs the --fine-grained set")
    p.add_argument("--d-ff", type=int,
                   help=f"expert ffn dim (default {D_FF}, with --fine-grained/--shared {FINE_D_FF})")
    p.add_argument("--shared-ff", type=int, help="shared expert's ffn dim (default 2 x --d-ff)")
    p.add_argument("--impls", default="auto",
                   help="dmoe expert formulations, comma separated: auto, fused, loop, torch_grouped_mm")
    p.add_argument("--activation", default="gelu", choices=["gelu", "swiglu"])
    p.add_argument("--expert-dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=15)
    p.add_argument("--budget", type=float, default=8.0, help="seconds of timing per case")
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--no-torchtitan", action="store_true",
                   help="skip the torchtitan peer (bench/install_peers.sh installs it)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda[:i]: layers, inputs and limit on that device; "
                        "CUDA timing synchronizes around each rep, memory from max_memory_allocated")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of dmoe's step")
    p.add_argument("--table", metavar="JSONL", help="only print the table of a saved run")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel ranks (forked, gloo); --tokens is then per rank")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default (returns big blocks to the OS: page faults every step)")
    args = p.parse_args(argv)
    args.fine_grained = args.fine_grained or (args.shared and not args.quick)
    case_set = FINE if args.fine_grained else GRID
    for key, values in case_set.items():
        if getattr(args, key) is None:
            setattr(args, key, values)
    if args.d_ff is None:
        args.d_ff = FINE_D_FF if args.fine_grained else D_FF
    shared_ff = (args.shared_ff or 2 * args.d_ff) if args.shared else None
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
    if args.ep > 1 and args.device != "cpu":
        p.error(f"--ep {args.ep} runs gloo ranks on the CPU; --device ({args.device}) must be cpu")
    if args.ep > 1 and (args.impls != ["auto"] or args.no_deepspeed or args.profile or args.shared):
        p.error("--ep > 1 runs dmoe (impl auto), DeepSpeed, the limit and the all-to-all alone, "
                "without a shared expert")
    torch.set_num_threads(1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device ({args.device}): torch.cuda.is_available() is False")
    if args.profile:
        return profile_case(args)
    if args.quick:
        cases = [Case(*c, args.d_ff, shared_ff) for c in QUICK]
    else:
        cases = [Case(*c, args.d_ff, shared_ff)
                 for c in itertools.product(args.tokens, args.experts, args.k, args.cf)]
    if args.ep > 1:
        import moe_layer_ep

        if any(deepspeed_gating(c.k) is None for c in cases):
            p.error("--ep > 1: this DeepSpeed has no gating for some k (top-1/top-2 only)")
        return moe_layer_ep.print_table(moe_layer_ep.run(args, cases))
    if not args.no_deepspeed:
        init_deepspeed("nccl" if args.device.startswith("cuda") else "gloo")
    rows = []
    for case in cases:
        rows.append(run_case(args, case))
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows, args.impls)


if __name__ == "__main__":
    main()
