"""The training loop: build, parallelize, train, evaluate, report.

One function per phase; the loop itself only moves batches through the engine and hands
figures to the metrics sink. Communication: inside the engine step (gradient reduction),
the MoE dispatchers (all-to-all under EP), and `_mean_over_dp` for logged figures.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dmoe.config import Config, save_config
from dmoe.data.sampler import epoch_batch
from dmoe.data.shards import TokenData, prepare, sample_batch
from dmoe.model.transformer import MoETransformer
from dmoe.parallel.launch_env import LaunchInfo
from dmoe.parallel.layout import ParallelLayout, build_process_groups
from dmoe.parallel.parallelize import parallelize
from dmoe.train import checkpoint
from dmoe.train.engines import DeepSpeedEngine, TorchEngine
from dmoe.train.metrics import MetricsSink

log = logging.getLogger(__name__)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to min_lr at the last step."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def _mean_over_dp(values: list[float], groups, device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if groups.size("dp") > 1:
        dist.all_reduce(t, group=groups.dp)
        t /= groups.size("dp")
    return t.tolist()


def _sum_over_dp(t: torch.Tensor, groups) -> torch.Tensor:
    t = t.to(torch.float64).clone()
    if groups.size("dp") > 1:
        dist.all_reduce(t, group=groups.dp)
    return t


def prepare_data(cfg: Config, info: LaunchInfo) -> TokenData:
    """Rank 0 tokenizes (if needed); everyone maps the result."""
    if info.rank == 0:
        prepare(cfg.data)
    if dist.is_initialized():
        dist.barrier()
    data = TokenData.open(Path(cfg.data.data_dir))
    cfg.model.vocab_size = data.vocab_size
    return data


def build(cfg: Config, info: LaunchInfo, device, engine_name: str):
    layout = ParallelLayout(info.world_size, tp=cfg.parallel.tp, ep=cfg.parallel.ep)
    layout.validate(cfg.moe.num_experts)
    groups = build_process_groups(layout, info.rank)
    torch.manual_seed(cfg.train.seed)  # same full model on every rank, then sharded
    model = MoETransformer(cfg)
    parallelize(model, groups)
    model.to(device)
    engine_cls = DeepSpeedEngine if engine_name == "deepspeed" else TorchEngine
    return engine_cls(model, cfg, groups), groups, layout


@torch.no_grad()
def evaluate(engine, data: TokenData, cfg: Config, groups, device) -> float:
    engine.train(False)
    t, losses = cfg.train, []
    for i in range(t.eval_batches):
        x, y = sample_batch(data.val, t.micro_batch_size, cfg.model.seq_len, t.seed + 1, i, groups.index("dp"))
        losses.append(float(engine.forward(x.to(device), y.to(device)).ce_loss))
    engine.train(True)
    return _mean_over_dp([sum(losses) / len(losses)], groups, device)[0]


def _moe_figures(outputs, groups) -> tuple[dict, dict]:
    """Drop fraction, aux/z losses and per-layer expert load, summed over DP ranks."""
    stats = [s for out in outputs for s in out.moe_stats]
    if not stats:
        return {}, {}
    n_layers = len(outputs[0].moe_stats)
    routed = torch.stack([s.routed_E for s in stats]).view(len(outputs), n_layers, -1).sum(0)
    kept = torch.stack([s.kept_E for s in stats]).view(len(outputs), n_layers, -1).sum(0)
    routed, kept = _sum_over_dp(routed, groups), _sum_over_dp(kept, groups)
    load = routed / routed.sum(-1, keepdim=True).clamp(min=1)
    scalars = {
        "drop_frac": float(1 - kept.sum() / routed.sum().clamp(min=1)),
        "load_max_over_mean": float((load.max(-1).values * load.shape[-1]).mean()),
    }
    lists = {"expert_load": routed.sum(0).tolist(),
             "drop_frac_per_layer": (1 - kept.sum(-1) / routed.sum(-1).clamp(min=1)).tolist()}
    return scalars, lists


def train(cfg: Config, info: LaunchInfo, device, engine_name: str) -> dict:
    t = cfg.train
    run_dir = Path(t.run_dir)
    data = prepare_data(cfg, info)
    engine, groups, layout = build(cfg, info, device, engine_name)
    start = checkpoint.maybe_resume(cfg, engine, groups)  # 0: fresh start
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        log.info("engine %s, launcher %s, %s", engine.name, info.launcher, layout.describe().splitlines()[0])
        log.info("parameters: %s", engine.module.num_params())
    sink = MetricsSink(run_dir, t.steps, enabled=info.rank == 0, console=os.environ.get("DMOE_NO_PROGRESS") != "1")
    tokens_per_step = t.micro_batch_size * t.grad_accum * cfg.model.seq_len * groups.size("dp")
    dp_rank = groups.index("dp")
    train_batch = sample_batch if cfg.data.sampler == "random" else \
        functools.partial(epoch_batch, dp=groups.size("dp"))
    history, t0, window_t0 = {"val": []}, time.time(), time.time()
    try:
        val = evaluate(engine, data, cfg, groups, device)
        history["val"].append((start, val))
        sink.log(start, {"val_loss": val, "val_ppl": math.exp(val)}, kind="eval")
        for step in range(start + 1, t.steps + 1):
            outputs, lr = [], lr_at(step - 1, cfg)
            for micro in range(t.grad_accum):
                x, y = train_batch(data.train, t.micro_batch_size, cfg.model.seq_len, t.seed,
                                    (step - 1) * t.grad_accum + micro, dp_rank)
                out = engine.forward(x.to(device), y.to(device))
                engine.backward(out.loss)
                norm = engine.step(lr)
                outputs.append(out)
            if step % t.log_every == 0 or step == t.steps:
                elapsed = time.time() - window_t0
                steps_in_window = t.log_every if step % t.log_every == 0 else step % t.log_every
                names = ("loss", "ce_loss", "aux_loss", "z_loss")
                means = [sum(float(getattr(o, n).detach()) if getattr(o, n) is not None else 0.0
                             for o in outputs) / len(outputs) for n in names]
                scalars = dict(zip(names, _mean_over_dp(means, groups, device)))
                moe_scalars, lists = _moe_figures(outputs, groups)
                scalars.update(moe_scalars, lr=lr, grad_norm=norm or 0.0,
                               tokens_per_s=tokens_per_step * steps_in_window / max(elapsed, 1e-9))
                sink.log(step, scalars, lists)
                window_t0 = time.time()
            else:
                sink.advance(step)
            if step % t.eval_every == 0 or step == t.steps:
                val = evaluate(engine, data, cfg, groups, device)
                history["val"].append((step, val))
                sink.log(step, {"val_loss": val, "val_ppl": math.exp(val)}, kind="eval")
            if t.save_every and (step % t.save_every == 0 or step == t.steps):
                checkpoint.save_checkpoint(engine, cfg, groups, step, {"step": step, "seed": t.seed})
    finally:
        sink.close()
    summary = {
        "engine": engine.name, "launcher": info.launcher, "world_size": info.world_size,
        "steps": t.steps, "seconds": round(time.time() - t0, 1),
        "val_loss_first": history["val"][0][1], "val_loss_last": history["val"][-1][1],
        "val_curve": history["val"], "tokens_per_step": tokens_per_step,
    }
    if info.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("done in %.1fs: val loss %.3f -> %.3f", summary["seconds"],
                 summary["val_loss_first"], summary["val_loss_last"])
    return summary
