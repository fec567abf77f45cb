"""train.activation_checkpointing: peak memory and step time of none / block / experts.

    .venv/bin/python bench/activation_checkpointing.py                 # default + wider model

One process, one thread, the default model (d_model 128) and a wider one (d_model 512,
expert ffn 1024, 8 blocks every one MoE), a micro-batch of 16 x 128 tokens. Per mode:
the high-water mark of live CPU tensor bytes during forward + backward above the level at
its start (torch.profiler's memory events, as bench/moe_layer.py), and the median wall
time of forward + backward over --reps interleaved reps. Prints JSON lines and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_common import peak_live_bytes  # noqa: E402  (bench/ is on sys.path: the script's directory)

from dmoe.config import load_config  # noqa: E402
from dmoe.model.transformer import MoETransformer  # noqa: E402

MODES = ("none", "block", "experts")
MODELS = {
    "default": ["--config-file", "configs/default.yaml"],
    "wide": ["--model.d_model=512", "--model.n_heads=8", "--model.n_layers=8", "--model.ffn_dim=2048",
             "--moe.every=1", "--moe.expert_ffn_dim=1024", "--moe.num_experts=8"],
}


def build(model: str, mode: str) -> MoETransformer:
    args = MODELS[model]
    path = args[1] if args[0] == "--config-file" else None
    overrides = [] if path else list(args)
    cfg = load_config(path, [*overrides, "--model.vocab_size=256",
                             f"--train.activation_checkpointing={mode}"])
    torch.manual_seed(0)
    return MoETransformer(cfg)


def step(model: MoETransformer, batch) -> None:
    for p in model.parameters():
        p.grad = None
    model(*batch).loss.backward()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        models = {mode: build(name, mode) for mode in MODES}
        seq = models["none"].cfg.model.seq_len
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 256, (args.batch, seq + 1), generator=g)
        batch = (tokens[:, :-1], tokens[:, 1:])
        peaks = {mode: peak_live_bytes(lambda m=m: step(m, batch)) for mode, m in models.items()}
        times = {mode: [] for mode in MODES}
        for r in range(args.reps + 1):
            for mode in MODES[r % 3:] + MODES[:r % 3]:  # rotate the order rep by rep
                t0 = time.perf_counter()
                step(models[mode], batch)
                if r:  # rep 0 warms up
                    times[mode].append(time.perf_counter() - t0)
        for mode in MODES:
            row = {"model": name, "mode": mode, "tokens": args.batch * seq,
                   "peak_mb": round(peaks[mode] / 2**20, 1),
                   "peak_vs_none": round(peaks[mode] / peaks["none"], 3),
                   "fwd_bwd_ms": round(statistics.median(times[mode]) * 1e3, 1),
                   "time_vs_none": round(statistics.median(times[mode]) / statistics.median(times["none"]), 3)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'model':<8} {'mode':<8} {'peak MB':>8} {'x none':>7} {'fwd+bwd ms':>11} {'x none':>7}")
    for r in rows:
        print(f"{r['model']:<8} {r['mode']:<8} {r['peak_mb']:>8.1f} {r['peak_vs_none']:>7.2f} "
              f"{r['fwd_bwd_ms']:>11.1f} {r['time_vs_none']:>7.2f}")


if __name__ == "__main__":
    main()
