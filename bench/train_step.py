"""Training-step time of the MoE model against a dense model with the same active
parameters per token (dense FFN width = k x expert FFN width), in the same process.

The seed claim of MoE: parameters grow with experts while the cost per token does not.
Reported per expert count: fwd+bwd ms and full-step ms (with AdamW) for MoE and dense,
and their ratios. The optimizer step touches every parameter, so it does grow with the
expert count; fwd+bwd is where the claim lives. Prints one JSON line per case + a table.

    .venv/bin/python bench/train_step.py --experts 8 16 32 64
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmoe.config import load_config  # noqa: E402
from dmoe.model.transformer import MLP, MoETransformer  # noqa: E402
from dmoe.moe.layer import MoELayer  # noqa: E402


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


def time_model(model, args, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    fb, full = [], []
    for i in range(args.warmup + args.reps):
        t0 = time.perf_counter()
        out = model(*batch)
        out.loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i >= args.warmup:
            fb.append(t1 - t0)
            full.append(t2 - t0)
    return statistics.median(fb) * 1e3, statistics.median(full) * 1e3


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
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (args.batch, args.seq + 1), generator=g)
    batch = (tokens[:, :-1], tokens[:, 1:])
    rows = []
    for experts in args.experts:
        moe, dense = build(args, experts, False), build(args, experts, True)
        # alternate the two so that machine noise hits both alike
        m1, d1 = time_model(moe, args, batch), time_model(dense, args, batch)
        m2, d2 = time_model(moe, args, batch), time_model(dense, args, batch)
        moe_fb, moe_full = min(m1[0], m2[0]), min(m1[1], m2[1])
        dense_fb, dense_full = min(d1[0], d2[0]), min(d1[1], d2[1])
        row = {
            "experts": experts, "tokens": args.batch * args.seq, "moe_params_M": sum(
                q.numel() for q in moe.parameters()) / 1e6,
            "dense_params_M": sum(q.numel() for q in dense.parameters()) / 1e6,
            "moe_fwd_bwd_ms": moe_fb, "dense_fwd_bwd_ms": dense_fb, "fwd_bwd_ratio": moe_fb / dense_fb,
            "moe_step_ms": moe_full, "dense_step_ms": dense_full, "step_ratio": moe_full / dense_full,
        }
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append(row)
    print(f"\n{'experts':>7} {'params M':>9} {'fwd+bwd MoE':>12} {'dense':>8} {'ratio':>6} "
          f"{'step MoE':>9} {'dense':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['experts']:>7} {r['moe_params_M']:>9.1f} {r['moe_fwd_bwd_ms']:>10.1f}ms "
              f"{r['dense_fwd_bwd_ms']:>6.1f}ms {r['fwd_bwd_ratio']:>6.3f} {r['moe_step_ms']:>7.1f}ms "
              f"{r['dense_step_ms']:>6.1f}ms {r['step_ratio']:>6.3f}")
    base = rows[0]["fwd_bwd_ratio"]
    spread = max(abs(r["fwd_bwd_ratio"] / base - 1) for r in rows)
    print(f"fwd+bwd ratio spread across expert counts: {spread * 100:.1f}% "
          f"(target: ratio <= 1.15, spread <= 10%)")


if __name__ == "__main__":
    main()
