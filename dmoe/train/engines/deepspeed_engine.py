"""The DeepSpeed engine (under `deepspeed launch/train.py`): its optimizer, ZeRO 1/2,
accumulation, clipping and bf16, reducing each gradient where dmoe's torch engine does
(how: deepspeed_adapter.py beside this file). DeepSpeed is imported on first use.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from dmoe.checkpoint import optimizer_state
from dmoe.checkpoint.errors import CheckpointError
from dmoe.config import Config, ConfigError
from dmoe.model.transformer import ModelOutput
from dmoe.parallel.layout import ProcessGroups
from dmoe.train.nonfinite import nonfinite_values

from .param_groups import param_groups

log = logging.getLogger(__name__)


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp_size,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": t.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def check_deepspeed(cfg: Config) -> None:
    """Refuse settings where DeepSpeed would train differently from dmoe's reference.

    ZeRO 0 clips with `deepspeed.runtime.utils.clip_grad_norm_`, which averages each rank's
    local norm over DP; under EP the ranks hold different expert shards, so that average is
    not the global norm (ZeRO 1/2 sum squared partitions instead, and match exactly).
    Checkpoints read ZeRO 1/2 partitions, or a torch optimizer (ZeRO 0 in fp32); ZeRO 0 in
    bf16 is DeepSpeed's bf16 optimizer, refused before training rather than at the first save.
    """
    t, ep = cfg.train, cfg.parallel.ep
    if t.nonfinite == "skip":
        raise ConfigError("train.nonfinite (skip) needs train.engine=torch: DeepSpeed's optimizer "
                          "steps before dmoe sees the gradient norm; use train.nonfinite=stop")
    if t.zero_stage == 0 and ep > 1 and t.grad_clip > 0:
        raise ConfigError(
            f"train.zero_stage (0) with parallel.ep ({ep}) and train.grad_clip ({t.grad_clip}): "
            "DeepSpeed's ZeRO-0 clipping norm mixes expert shards; use train.zero_stage 1 or 2"
        )
    if t.zero_stage == 0 and t.precision == "bf16" and (t.save_every or t.resume):
        # DeepSpeed's bf16 optimizer keeps its own flat fp32 groups that dmoe does not read
        raise ConfigError(
            "train.zero_stage (0) with train.precision (bf16) and "
            f"train.save_every ({t.save_every}) or train.resume ({t.resume!r}): checkpoints "
            "under DeepSpeed need train.zero_stage 1 or 2, or fp32")


class DeepSpeedEngine:
    """DeepSpeed ZeRO 1/2 reducing and clipping as dmoe.parallel.grads does: see
    dmoe.train.engines.deepspeed_adapter for which DeepSpeed path handles which gradient."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, cfg: Config, groups: ProcessGroups):
        from . import deepspeed_adapter as dsg

        check_deepspeed(cfg)
        self.cfg = cfg
        dsg.tag_model_parallel(model, groups)
        self._tp_hooks = dsg.sum_tp_partial_grads(model, groups)
        self.engine, self.optimizer = dsg.initialize(
            model, groups, param_groups(model, cfg.train.weight_decay),
            deepspeed_config(cfg, groups.size("dp")),
        )
        self.module = self.engine.module
        self.nonfinite: str | None = None
        self._loss_bad: torch.Tensor | None = None  # any micro-batch loss of this step non-finite

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> ModelOutput:
        return self.engine(x, y)

    def backward(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad
        self.engine.backward(loss)

    def step(self, lr: float) -> float | None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
        self.engine.step()
        if not boundary:
            return None
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else None
        # after DeepSpeed's optimizer step (it cannot be skipped from here): the trainer
        # stops before anything of this state is saved; train.nonfinite=skip is refused
        self.nonfinite = nonfinite_values(self._loss_bad, norm, self._loss_bad.device)
        self._loss_bad = None
        return norm

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    # checkpoint state (dmoe.checkpoint.optimizer_state): ZeRO 1/2 through DeepSpeed's
    # tensor-fragment API (param_states is then a collective: call it for every param on
    # every rank)
    def param_states(self, param: nn.Parameter) -> dict:
        if not param.requires_grad:  # e.g. a router's expert bias: no optimizer state
            return {"param": param.detach()}
        if optimizer_state.is_zero_partitioned(param):
            return optimizer_state.zero_states(self.optimizer, param)
        return optimizer_state.torch_states(self._plain_optimizer(param), param)

    def load_param_states(self, param: nn.Parameter, states: dict) -> None:
        if not param.requires_grad:
            with torch.no_grad():
                param.copy_(states["param"])
            return
        if optimizer_state.is_zero_partitioned(param):
            optimizer_state.set_zero_states(self.optimizer, param, states)
        else:
            optimizer_state.set_torch_states(self._plain_optimizer(param), param, states)

    def _plain_optimizer(self, param: nn.Parameter):
        """ZeRO 0 in fp32: DeepSpeed's optimizer is the torch AdamW over the module's params."""
        if not optimizer_state.holds(self.optimizer, param):
            raise CheckpointError(
                f"train.engine=deepspeed with train.zero_stage ({self.cfg.train.zero_stage}) and "
                f"train.precision ({self.cfg.train.precision}): "
                f"{type(self.optimizer).__name__} has no per-parameter state to checkpoint; "
                "use train.zero_stage 1 or 2")
        return self.optimizer

    def resume_at(self, step: int) -> None:
        """DeepSpeed's own counters, as after `step` optimizer steps (a step boundary)."""
        self.engine.global_steps = step
        self.engine.micro_steps = step * self.cfg.train.grad_accum
        self.engine.global_samples = step * self.engine.train_batch_size()
