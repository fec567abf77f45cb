"""A checkpoint saved by dmoe's training save after a few real AdamW steps: a preset's
architecture at a tiny size, trained on byte windows of a stdlib source file (one gloo
rank, plain torch engine). For the export and generation tests.

    ckpt, loss = train_preset(tmp_path, "mixtral-tiny")   # tmp_path/run/checkpoints/step_000120
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dmoe.checkpoint.save import save_checkpoint
from dmoe.config import load_config
from dmoe.model.transformer import MoETransformer
from dmoe.parallel.layout import ParallelLayout, build_process_groups
from dmoe.train.engines import TorchEngine
from tests._dist import run_ranks

REPO = Path(__file__).resolve().parents[1]
TEXT = Path(argparse.__file__).read_bytes()[:60_000]
SEQ = 32
SHRINK = ["--model.d_model=32", "--model.n_layers=2", f"--model.seq_len={SEQ}",
          "--model.ffn_dim=64", "--model.vocab_size=256", "--train.micro_batch_size=8",
          "--train.lr=0.01"]


def byte_batch(step: int, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    starts = torch.randint(0, len(TEXT) - SEQ - 1, (rows,), generator=g)
    data = torch.tensor(np.frombuffer(TEXT, dtype=np.uint8).astype(np.int64))
    window = torch.stack([data[s:s + SEQ + 1] for s in starts.tolist()])
    return window[:, :-1], window[:, 1:]


def _train(rank, world, config, overrides, steps):
    cfg = load_config(config, overrides)
    groups = build_process_groups(ParallelLayout(world), rank)
    torch.manual_seed(0)
    engine = TorchEngine(MoETransformer(cfg), cfg, groups)
    loss = float("nan")
    for step in range(steps):
        out = engine.forward(*byte_batch(step))
        engine.backward(out.loss)
        engine.step(cfg.train.lr)
        loss = float(out.loss.detach())
    return str(save_checkpoint(engine, cfg, groups, steps)), loss


def train_preset(tmp_path: Path, preset: str, extra=(), steps: int = 120) -> tuple[Path, float]:
    """The checkpoint of configs/<preset>.yaml (shrunk) after `steps` steps, and the last
    training loss."""
    overrides = [*SHRINK, f"--train.run_dir={tmp_path / 'run'}", *extra]
    config = str(REPO / "configs" / f"{preset}.yaml")
    path, loss = run_ranks(_train, 1, args=(config, overrides, steps))[0]
    return Path(path), loss
