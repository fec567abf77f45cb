"""Non-finite losses and gradient norms: found at the step they appear, agreed by all ranks.

    bad = nonfinite_values(loss_bad, grad_norm, device)   # None, "loss", "grad_norm" or both
    raise NonFiniteError(...)                             # the trainer's one-line stop

Each engine calls `nonfinite_values` at every accumulation boundary, after the gradient
norm and (torch engine) before the optimizer step, which it then skips. Communication: one
all-reduce (MAX) of two flags over the world group, so that every rank (whose losses
differ) takes the same decision. Perplexity is `safe_exp` of the loss: inf past overflow.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite value; str(err) is the one line shown to the user."""


def nonfinite_values(loss_bad: torch.Tensor | bool, grad_norm: float | None,
                     device: torch.device) -> str | None:
    """Which of the step's values were non-finite on any rank ("loss", "grad_norm",
    "loss and grad_norm"), else None. Collective over the world group (one all-reduce)."""
    norm_bad = grad_norm is not None and not math.isfinite(grad_norm)
    flags = torch.stack([torch.as_tensor(loss_bad, dtype=torch.float32).reshape(()).to(device),
                         torch.tensor(float(norm_bad), device=device)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    names = [n for n, f in zip(("loss", "grad_norm"), flags.tolist()) if f > 0]
    return " and ".join(names) or None


def safe_exp(x: float) -> float:
    """exp(x), inf where it overflows (perplexity of a diverged loss), nan for nan."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
