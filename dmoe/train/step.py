"""One training step and one evaluation pass: the code every caller that trains shares
(the trainer, `dmoe profile`, `dmoe tune-capacity`), so they all train the same way.

    result = train_step(engine, data, cfg, groups, device, step)   # grad_accum micro-batches
    val_loss = evaluate(engine, data, cfg, groups, device)
    outputs = eval_outputs(engine, data, cfg, groups, device, batches)

A step is `train.grad_accum` micro-batches of `train.micro_batch_size` sequences per DP
rank, drawn by the sampler `data.sampler` names (a pure function of seed, step and DP
rank, so a resumed run continues in place), then, with `moe.bias_update_rate`, the
loss-free balancing update of every router's expert bias. Evaluation draws
`train.eval_batches` held-out micro-batches with seed + 1. Communication: inside the
engine (gradient reduction at the accumulation boundary), the MoE dispatchers, one
all-reduce over DP of the step's per-expert counts (bias update), and one all-reduce over
DP in `evaluate`.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dmoe.config import Config
from dmoe.data.sampler import epoch_batch, sample_batch
from dmoe.data.token_files import TokenData
from dmoe.model.transformer import ModelOutput
from dmoe.moe.layer import MoELayer
from dmoe.moe.router import update_expert_bias
from dmoe.parallel.layout import ProcessGroups

from .engines import Engine

Sampler = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StepResult:
    outputs: list[ModelOutput]  # one per micro-batch
    lr: float
    grad_norm: float | None  # None where the engine reports none
    nonfinite: str | None = None  # "loss", "grad_norm" or both (all ranks agree), else None
    # routed rows per MoE layer and expert, summed over the micro-batches and DP, where the
    # step computed them (the loss-free bias update); else None
    routed_LE: torch.Tensor | None = None


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to min_lr at the last step (step is 0-based)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def tokens_per_step(cfg: Config, groups: ProcessGroups) -> int:
    t = cfg.train
    return t.micro_batch_size * t.grad_accum * cfg.model.seq_len * groups.size("dp")


def train_sampler(cfg: Config, groups: ProcessGroups) -> Sampler:
    if cfg.data.sampler == "epoch":
        return functools.partial(epoch_batch, dp=groups.size("dp"))
    return sample_batch


def train_step(engine: Engine, data: TokenData, cfg: Config, groups: ProcessGroups,
               device: torch.device, step: int) -> StepResult:
    """Optimizer step `step` (1-based): forward, backward and engine step per micro-batch."""
    t, outputs, norm = cfg.train, [], None
    lr, sampler, dp_rank = lr_at(step - 1, cfg), train_sampler(cfg, groups), groups.index("dp")
    for micro in range(t.grad_accum):
        x, y = sampler(data.train, t.micro_batch_size, cfg.model.seq_len, t.seed,
                       (step - 1) * t.grad_accum + micro, dp_rank)
        out = engine.forward(x.to(device), y.to(device))
        engine.backward(out.loss)
        norm = engine.step(lr)
        outputs.append(out)
    routed_LE = None
    if cfg.moe.bias_update_rate > 0:
        routed_LE = update_router_biases(engine.module, outputs, groups, cfg.moe.bias_update_rate)
    return StepResult(outputs, lr, norm, engine.nonfinite, routed_LE)


def routed_over_dp(outputs: list[ModelOutput], groups: ProcessGroups) -> torch.Tensor:
    """[L, E] float64 routed rows of this step, summed over the micro-batches and the DP
    ranks (EP ranks are DP ranks; under TP the layer's counts are already whole-batch), so
    every rank holds the same counts. One all-reduce over DP."""
    routed_LE = torch.stack([torch.stack([s.routed_E for s in out.moe_stats]) for out in outputs])
    routed_LE = routed_LE.sum(0).to(torch.float64)
    if groups.size("dp") > 1:
        dist.all_reduce(routed_LE, group=groups.dp)
    return routed_LE


def update_router_biases(model: torch.nn.Module, outputs: list[ModelOutput], groups: ProcessGroups,
                         rate: float) -> torch.Tensor:
    """Every router's loss-free balancing step from this step's routed counts over DP
    (`routed_over_dp`), so all ranks apply the same update; returns those counts."""
    routers = [m.router for m in model.modules() if isinstance(m, MoELayer)]
    routed_LE = routed_over_dp(outputs, groups)
    for router, routed_E in zip(routers, routed_LE):
        update_expert_bias(router.expert_bias, routed_E, rate)
    return routed_LE


@torch.no_grad()
def eval_outputs(engine: Engine, data: TokenData, cfg: Config, groups: ProcessGroups,
                 device: torch.device, batches: int) -> list[ModelOutput]:
    """`batches` held-out micro-batches through the model in eval mode (this rank's)."""
    t, outputs = cfg.train, []
    engine.train(False)
    try:
        for i in range(batches):
            x, y = sample_batch(data.val, t.micro_batch_size, cfg.model.seq_len, t.seed + 1, i,
                                groups.index("dp"))
            outputs.append(engine.forward(x.to(device), y.to(device)))
    finally:
        engine.train(True)
    return outputs


def evaluate(engine: Engine, data: TokenData, cfg: Config, groups: ProcessGroups,
             device: torch.device) -> float:
    """Mean held-out cross-entropy over `train.eval_batches` micro-batches and the DP ranks."""
    outputs = eval_outputs(engine, data, cfg, groups, device, cfg.train.eval_batches)
    local = sum(float(o.ce_loss) for o in outputs) / len(outputs)
    return mean_over_dp([local], groups, device)[0]


def mean_over_dp(values: list[float], groups: ProcessGroups, device: torch.device) -> list[float]:
    """Communication: one all-reduce over DP."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if groups.size("dp") > 1:
        dist.all_reduce(t, group=groups.dp)
        t /= groups.size("dp")
    return t.tolist()
