"""The plain torch engine (torchrun, srun, mpirun, python): AdamW, dmoe's gradient
reduction over DP / expert-DP / TP (dmoe.parallel.grads), accumulation, clipping, bf16
autocast. Communication: the gradient reduction and norm at accumulation boundaries, and
one all-reduce of the non-finite flags (dmoe.train.nonfinite) there.
"""
from __future__ import annotations

import torch
from torch import nn

from dmoe.checkpoint import optimizer_state
from dmoe.config import Config
from dmoe.model.transformer import ModelOutput
from dmoe.parallel.grads import clip_gradients, reduce_gradients
from dmoe.parallel.layout import ProcessGroups
from dmoe.train.nonfinite import nonfinite_values

from .param_groups import param_groups


def adamw(params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, **kw) -> torch.optim.AdamW:
    """torch's AdamW in a multi-tensor form instead of its per-parameter Python loop (the
    CPU default): `fused` when every parameter is on the CPU (one kernel per parameter,
    measured 2-3x faster than the loop: bench/README.md), `foreach` elsewhere (a fused
    step there would want its step counters on the device, which the checkpoint loader
    keeps on the CPU). The same AdamW arithmetic: tests/unit/test_adamw_impl.py."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if "fused" not in kw and "foreach" not in kw:
        on_cpu = all(p.device.type == "cpu" for p in tensors)
        kw = {**kw, "fused": True} if on_cpu else {**kw, "foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)


class TorchEngine:
    """AdamW with dmoe's own gradient reduction and clipping (dmoe.parallel.grads)."""

    name = "torch"

    def __init__(self, model: nn.Module, cfg: Config, groups: ProcessGroups):
        self.module, self.cfg, self.groups = model, cfg, groups
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = adamw(
            [{k: v for k, v in g.items() if k in ("params", "weight_decay")}
             for g in param_groups(model, cfg.train.weight_decay)],
            lr=cfg.train.lr,
        )
        self.micro = 0
        self.nonfinite: str | None = None  # what was non-finite at the last boundary (step skipped)
        self._loss_bad = torch.zeros((), dtype=torch.bool)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> ModelOutput:
        if self.cfg.train.precision == "bf16":
            # bf16 activations and matmuls, fp32 weights, grads and optimizer state
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return self.module(x, y)
        return self.module(x, y)

    def backward(self, loss: torch.Tensor) -> None:
        if self.micro % self.cfg.train.grad_accum == 0:
            # a new accumulation window; grads of the last step stay readable until here
            self.optimizer.zero_grad(set_to_none=True)
            self._loss_bad = torch.zeros((), dtype=torch.bool, device=loss.device)
        self._loss_bad = self._loss_bad | ~torch.isfinite(loss.detach()).all()
        (loss / self.cfg.train.grad_accum).backward()

    def step(self, lr: float) -> float | None:
        self.micro += 1
        if self.micro % self.cfg.train.grad_accum:
            return None
        reduce_gradients(self.params, self.groups)
        norm = clip_gradients(self.params, self.groups, self.cfg.train.grad_clip)
        # all ranks agree (one all-reduce); a non-finite step never reaches the optimizer
        self.nonfinite = nonfinite_values(self._loss_bad, norm, self._loss_bad.device)
        if self.nonfinite:
            return norm
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        return norm

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    # checkpoint state (dmoe.checkpoint.optimizer_state): whole tensors of one param, no
    # communication
    def param_states(self, param: nn.Parameter) -> dict:
        return optimizer_state.torch_states(self.optimizer, param)

    def load_param_states(self, param: nn.Parameter, states: dict) -> None:
        optimizer_state.set_torch_states(self.optimizer, param, states)

    def resume_at(self, step: int) -> None:
        self.micro = step * self.cfg.train.grad_accum
