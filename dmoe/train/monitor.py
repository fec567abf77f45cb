"""What the training loop measures and logs besides the loss: per-layer routing, step time,
tokens/s, MFU, all-to-all time, peak memory and dead experts.

    monitor = TrainMonitor(cfg, engine.module, groups, device, tokens_per_step)
    with monitor.timed(step, log_step):      # comm recorder active on log steps only
        result = train_step(...)
    monitor.after_step(step, result)         # dead-expert bookkeeping (every step)
    scalars, lists = monitor.figures(result) # on log steps: agreed over ranks

Communication: the constructor measures the matmul peak when train.peak_tflops is 0 (one
all-reduce over the world); `after_step`, with train.dead_expert_steps > 0, one all-reduce
over DP of the [L, E] routed counts (none when the loss-free bias update already made it);
`figures` all-reduces the loss means and the routed/kept counts over DP and the speed and
memory figures over the world (sum and max). Shape legend: L MoE layers, E experts.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from dmoe.config import Config
from dmoe.model.flops import train_flops_per_token
from dmoe.model.transformer import ModelOutput
from dmoe.moe.layer import MoELayer
from dmoe.parallel import comm_trace
from dmoe.parallel.comm_trace import CommRecorder
from dmoe.parallel.layout import ProcessGroups

from .dead_experts import DeadExpertTracker
from .speed import a2a_seconds, agree, mfu, peak_flops_per_rank, peak_memory
from .step import StepResult, mean_over_dp, routed_over_dp

LOSSES = ("loss", "ce_loss", "aux_loss", "z_loss", "seq_aux_loss")


def _sum_over_dp(t: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
    t = t.to(torch.float64).clone()
    if groups.size("dp") > 1:
        dist.all_reduce(t, group=groups.dp)
    return t


def moe_figures(outputs: list[ModelOutput], groups: ProcessGroups) -> tuple[dict, dict]:
    """Drop fraction and expert load per MoE layer, counted over the step's micro-batches and
    the DP ranks. Scalars: the overall drop fraction (dropped / routed over all layers) and
    the mean over layers of max/mean load; lists: one entry per layer."""
    stats = [s for out in outputs for s in out.moe_stats]
    if not stats:
        return {}, {}
    n_layers = len(outputs[0].moe_stats)
    routed_LE = torch.stack([s.routed_E for s in stats]).view(len(outputs), n_layers, -1).sum(0)
    kept_LE = torch.stack([s.kept_E for s in stats]).view(len(outputs), n_layers, -1).sum(0)
    routed_LE, kept_LE = _sum_over_dp(routed_LE, groups), _sum_over_dp(kept_LE, groups)
    load_LE = routed_LE / routed_LE.sum(-1, keepdim=True).clamp(min=1)
    max_over_mean_L = load_LE.max(-1).values * load_LE.shape[-1]
    scalars = {"drop_frac": float(1 - kept_LE.sum() / routed_LE.sum().clamp(min=1)),
               "load_max_over_mean": float(max_over_mean_L.mean())}
    lists = {"expert_load_per_layer": routed_LE.to(torch.int64).tolist(),
             "drop_frac_per_layer": (1 - kept_LE.sum(-1) / routed_LE.sum(-1).clamp(min=1)).tolist(),
             "load_max_over_mean_per_layer": max_over_mean_L.tolist()}
    return scalars, lists


class TrainMonitor:
    def __init__(self, cfg: Config, model: torch.nn.Module, groups: ProcessGroups,
                 device: torch.device, tokens_per_step: int):
        self.groups, self.device, self.tokens = groups, torch.device(device), tokens_per_step
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
        for i, (_, layer) in enumerate(layers):
            layer.dispatcher.set_layer_id(i)  # comm events named by MoE layer
        self.num_layers = len(layers)
        self.dead = DeadExpertTracker(cfg.train.dead_expert_steps,
                                      [f"moe{i} ({name})" for i, (name, _) in enumerate(layers)])
        self.recorder = CommRecorder(groups)
        self.flops_per_token = train_flops_per_token(cfg)
        self.peak_flops = peak_flops_per_rank(cfg.train.peak_tflops, self.device)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.train_s, self.steps = 0.0, 0  # train_step wall time since the last log step

    @contextmanager
    def timed(self, step: int, log_step: bool):
        """Times one train_step; on log steps with the comm recorder active."""
        if log_step:
            self.recorder.start_step(step)
        t0 = time.perf_counter()
        with comm_trace.recording(self.recorder if log_step else None):
            yield
            if log_step and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.train_s += time.perf_counter() - t0
        self.steps += 1

    def after_step(self, step: int, result: StepResult, rank: int) -> None:
        if self.dead.steps <= 0 or not self.num_layers:
            return
        routed_LE = result.routed_LE if result.routed_LE is not None else routed_over_dp(result.outputs, self.groups)
        newly_dead = self.dead.update(step, routed_LE)
        if newly_dead and rank == 0:
            self.dead.warn(step, newly_dead)

    def figures(self, result: StepResult) -> tuple[dict, dict]:
        """The log step's scalars and per-layer lists, the same on every rank."""
        outputs = result.outputs
        means = [sum(float(getattr(o, n).detach()) if getattr(o, n) is not None else 0.0
                     for o in outputs) / len(outputs) for n in LOSSES]
        scalars = dict(zip(LOSSES, mean_over_dp(means, self.groups, self.device)))
        moe_scalars, lists = moe_figures(outputs, self.groups)
        scalars.update(moe_scalars, lr=result.lr, grad_norm=result.grad_norm or 0.0)
        scalars.update(self._speed(lists))
        if self.dead.steps > 0 and self.num_layers:
            dead = self.dead.dead_per_layer() or [0] * self.num_layers
            scalars["dead_experts"] = sum(dead)
            lists["dead_experts_per_layer"] = dead
        return scalars, lists

    def _speed(self, lists: dict) -> dict:
        a2a_s, a2a_L = a2a_seconds(self.recorder.end_step(), self.num_layers)
        mem_name, mem_mib = peak_memory(self.device)
        local_step_s = self.train_s / max(self.steps, 1)
        mean, high = agree([local_step_s, a2a_s, mem_mib, *a2a_L], self.device)
        self.train_s, self.steps = 0.0, 0
        step_s = high[0]  # the slowest rank sets the pace
        tokens_per_s = self.tokens / step_s if step_s > 0 else 0.0
        if self.num_layers:
            lists["a2a_ms_per_layer"] = [s * 1e3 for s in mean[3:]]
        return {"step_ms": step_s * 1e3, "tokens_per_s": tokens_per_s,
                "mfu": mfu(self.flops_per_token, tokens_per_s, self.world, self.peak_flops),
                "a2a_ms": mean[1] * 1e3, "a2a_ms_max": high[1] * 1e3, mem_name: high[2]}
