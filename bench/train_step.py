"""Training-step time of the MoE model against a dense model with the same active
parameters per token (dense FFN width = k x expert FFN width), in the same process.

The seed claim of MoE: parameters grow with experts while the cost per token does not.
Per expert count, MoE and dense are timed interleaved rep by rep (the order alternating),
each rep split into forward + backward and the optimizer step (the engine's AdamW,
dmoe.train.engines.torch_engine.adamw), reported apart: fwd+bwd is where the claim lives,
while the optimizer touches every parameter and so grows with E on one device. The
sharded columns time the same AdamW on what one rank holds when the experts are
sharded over EP ranks (ZeRO / EP: E/ep experts per rank, ep = E/8 keeps 8): the growth
goes away. One JSON line per case on stdout, then a table.

    nice .venv/bin/python bench/train_step.py --experts 8 16 32 64        # ~4 min on 1 core
    .venv/bin/python bench/train_step.py --compare-optimizers --experts 64  # for-loop/foreach/fused
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmoe.config import load_config
from dmoe.model.transformer import MLP, MoETransformer
from dmoe.moe.layer import MoELayer
from dmoe.train.engines.torch_engine import adamw

# as bench/moe_layer.py: freed memory stays in the process (no mmap/munmap page faults per step)
CACHING_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2 ** 40),
                  "MALLOC_TOP_PAD_": str(256 * 2 ** 20)}
EXPERTS_PER_RANK = 8


def build(args, experts: int, dense: bool) -> nn.Module:
    cfg = load_config(None, [
        f"--model.d_model={args.d_model}", f"--model.n_layers={args.layers}", "--model.n_heads=4",
        f"--model.seq_len={args.seq}", f"--model.ffn_dim={args.top_k * args.expert_ffn}",
        f"--moe.num_experts={experts}", f"--moe.top_k={args.top_k}", "--moe.every=1",
        f"--moe.expert_ffn_dim={args.expert_ffn}", f"--moe.capacity_factor={args.capacity_factor}",
        f"--moe.activation={args.activation}", f"--moe.expert_dtype={args.expert_dtype}",
    ])
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    if dense:  # same active parameters per token: one MLP of width k * expert_ffn
        for block in model.blocks:
            if isinstance(block.ffn, MoELayer):
                block.ffn = MLP(args.d_model, args.top_k * args.expert_ffn)
    return model


def shard_params(model: nn.Module, ep: int) -> list[torch.Tensor]:
    """What one EP rank holds: every non-expert parameter, and 1/ep of each expert stack
    (fresh leaves with random gradients; only the optimizer step is timed on them)."""
    out = []
    for name, p in model.named_parameters():
        keep = p[: p.shape[0] // ep] if name.endswith(("experts.w1", "experts.w2")) else p
        leaf = keep.detach().clone().requires_grad_()
        leaf.grad = torch.randn_like(leaf)
        out.append(leaf)
    return out


def time_optimizer(params, reps: int, **kw) -> float:
    opt = adamw([{"params": params, "weight_decay": 0.1}], lr=1e-4, **kw)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[1:])


def interleaved(models, batch, args):
    """fwd+bwd and optimizer step, per model, interleaved rep by rep (order alternating)."""
    opts = {name: adamw(m.parameters(), lr=1e-4) for name, m in models.items()}
    fb = {name: [] for name in models}
    step = {name: [] for name in models}
    names = list(models)
    gc.disable()
    try:
        for rep in range(args.warmup + args.reps):
            for name in names if rep % 2 == 0 else names[::-1]:
                opts[name].zero_grad(set_to_none=True)
                gc.collect()
                t0 = time.perf_counter()
                models[name](*batch).loss.backward()
                t1 = time.perf_counter()
                opts[name].step()
                t2 = time.perf_counter()
                if rep >= args.warmup:
                    fb[name].append(t1 - t0)
                    step[name].append(t2 - t1)
    finally:
        gc.enable()
    return fb, step


def ffn_only(moe, dense, args) -> dict:
    """The first block's FFN alone (MoE layer vs dense MLP), fwd+bwd on the same random
    hidden states, interleaved: how much of the model's gap is the FFN itself."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.seq, args.d_model, generator=gen).requires_grad_()
    g = torch.randn(args.batch, args.seq, args.d_model, generator=gen)
    ffns = {"moe": moe.blocks[0].ffn, "dense": dense.blocks[0].ffn}

    def run(name):
        out = ffns[name](x)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(g)

    wall = {n: [] for n in ffns}
    for rep in range(args.warmup + args.reps):
        for name in list(ffns) if rep % 2 == 0 else list(ffns)[::-1]:
            x.grad = None
            for p in ffns[name].parameters():
                p.grad = None
            t0 = time.perf_counter()
            run(name)
            if rep >= args.warmup:
                wall[name].append(time.perf_counter() - t0)
    return {"moe_ffn_ms": 1e3 * statistics.median(wall["moe"]),
            "dense_ffn_ms": 1e3 * statistics.median(wall["dense"]),
            "ffn_ratio": statistics.median(m / d for m, d in zip(wall["moe"], wall["dense"]))}


def case(args, experts, batch) -> dict:
    moe, dense = build(args, experts, False), build(args, experts, True)
    fb, opt = interleaved({"moe": moe, "dense": dense}, batch, args)
    med = lambda xs: 1e3 * statistics.median(xs)
    low = lambda xs: 1e3 * min(xs)
    ep = max(1, experts // EXPERTS_PER_RANK)
    row = {
        "experts": experts, "tokens": args.batch * args.seq,
        "moe_params_M": sum(q.numel() for q in moe.parameters()) / 1e6,
        "dense_params_M": sum(q.numel() for q in dense.parameters()) / 1e6,
        "moe_fwd_bwd_ms": med(fb["moe"]), "dense_fwd_bwd_ms": med(fb["dense"]),
        "moe_fwd_bwd_min_ms": low(fb["moe"]), "dense_fwd_bwd_min_ms": low(fb["dense"]),
        "moe_opt_ms": med(opt["moe"]), "dense_opt_ms": med(opt["dense"]),
        # per-rep ratio (the two ran back to back), then its median: noise hits both alike
        "fwd_bwd_ratio": statistics.median(m / d for m, d in zip(fb["moe"], fb["dense"])),
        "fwd_bwd_ratio_of_min": min(fb["moe"]) / min(fb["dense"]),
        "step_ratio": statistics.median((m + mo) / (d + do) for m, mo, d, do in zip(
            fb["moe"], opt["moe"], fb["dense"], opt["dense"])),
        "sharded_ep": ep, "sharded_opt_ms": time_optimizer(shard_params(moe, ep), args.reps),
        "reps": args.reps, **ffn_only(moe, dense, args),
    }
    sharded_s = row["sharded_opt_ms"] / 1e3  # per rep, as step_ratio, with this rank's optimizer
    row["sharded_step_ratio"] = statistics.median((m + sharded_s) / (d + do) for m, d, do in zip(
        fb["moe"], fb["dense"], opt["dense"]))
    return row


def compare_optimizers(args, experts):
    params = shard_params(build(args, experts, False), 1)
    out = {"experts": experts, "params_M": sum(p.numel() for p in params) / 1e6}
    for name, kw in (("for_loop", {"foreach": False, "fused": False}), ("foreach", {"foreach": True}),
                     ("fused", {"fused": True})):
        out[f"{name}_ms"] = time_optimizer(params, args.reps, **kw)
    print(json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--expert-ffn", type=int, default=512)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--capacity-factor", default="null", help="null = dropless (the same FLOPs as dense)")
    p.add_argument("--activation", default="gelu")
    p.add_argument("--expert-dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--compare-optimizers", action="store_true")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc")
    args = p.parse_args()
    if not args.system_malloc and os.environ.get("MALLOC_MMAP_MAX_") != "0":
        sys.exit(subprocess.call([sys.executable, *sys.argv], env={**os.environ, **CACHING_MALLOC}))
    torch.set_num_threads(args.threads)
    if args.compare_optimizers:
        for experts in args.experts:
            compare_optimizers(args, experts)
        return
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (args.batch, args.seq + 1), generator=g)
    batch = (tokens[:, :-1], tokens[:, 1:])
    rows = []
    for experts in args.experts:
        row = case(args, experts, batch)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append(row)
    print_table(rows)


def print_table(rows, file=sys.stderr):
    print(f"\n{'E':>3} {'params M':>8} {'fwd+bwd MoE':>11} {'dense':>6} {'ratio':>6} {'(min)':>6} "
          f"{'opt MoE':>8} {'dense':>6} {'EP':>3} {'opt/rank':>8} {'step ratio':>10} {'sharded':>8} "
          f"{'FFN MoE':>7} {'dense':>6} {'ratio':>6}", file=file)
    for r in rows:
        print(f"{r['experts']:>3} {r['moe_params_M']:>8.1f} {r['moe_fwd_bwd_ms']:>11.0f} "
              f"{r['dense_fwd_bwd_ms']:>6.0f} {r['fwd_bwd_ratio']:>6.3f} {r['fwd_bwd_ratio_of_min']:>6.3f} "
              f"{r['moe_opt_ms']:>8.1f} {r['dense_opt_ms']:>6.1f} {r['sharded_ep']:>3} "
              f"{r['sharded_opt_ms']:>8.1f} {r['step_ratio']:>10.3f} {r['sharded_step_ratio']:>8.3f} "
              f"{r.get('moe_ffn_ms', 0):>7.0f} {r.get('dense_ffn_ms', 0):>6.0f} {r.get('ffn_ratio', 0):>6.3f}",
              file=file)
    ratios = [r["fwd_bwd_ratio"] for r in rows]
    print(f"fwd+bwd ratio: max {max(ratios):.3f}, spread max/min {max(ratios) / min(ratios) - 1:.1%} "
          f"(targets <= 1.15 and <= 10%)", file=file)


if __name__ == "__main__":
    main()
