"""Token-choice top-k router over a linear gate.

Shape legend: T tokens, D model dim, E experts, K top-k.

The router computes in at least float32 whatever the activation dtype, returns the chosen experts
and their gate weights, and the two auxiliary losses (Switch/GShard load balance and
ST-MoE router z-loss) as tensors for the training loop to weight and add.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Routing:
    expert_idx_TK: torch.Tensor  # int64
    gate_TK: torch.Tensor  # float32, differentiable, weights used in combine
    score_TK: torch.Tensor  # float32 router probability of each choice (for drop policy)
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


def load_balance_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor) -> torch.Tensor:
    """Switch/GShard loss E * sum_e f_e * P_e, f_e the share of assignments routed to e.

    Equals 1 under perfectly uniform routing; f_e carries no gradient, P_e does.
    """
    num_experts = probs_TE.shape[-1]
    counts_E = torch.bincount(expert_idx_TK.flatten(), minlength=num_experts)
    frac_E = counts_E.to(probs_TE.dtype) / max(expert_idx_TK.numel(), 1)
    mean_prob_E = probs_TE.sum(0) / max(probs_TE.shape[0], 1)  # 0 tokens: 0, not NaN
    return num_experts * torch.dot(frac_E, mean_prob_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-sum-exp of the router logits."""
    return torch.logsumexp(logits_TE, dim=-1).square().sum() / max(logits_TE.shape[0], 1)


class TopKRouter(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        jitter_eps: float = 0.0,
        normalize_topk: bool = True,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"moe.top_k ({top_k}) must be in [1, moe.num_experts ({num_experts})]")
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.num_experts, self.top_k = num_experts, top_k
        self.jitter_eps, self.normalize_topk = jitter_eps, normalize_topk

    def forward(self, x_TD: torch.Tensor) -> Routing:
        if self.training and self.jitter_eps > 0:
            noise = torch.empty_like(x_TD).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
            x_TD = x_TD * noise
        dtype = torch.promote_types(x_TD.dtype, torch.float32)  # at least fp32
        logits_TE = F.linear(x_TD.to(dtype), self.gate.weight.to(dtype))
        probs_TE = torch.softmax(logits_TE, dim=-1)
        score_TK, expert_idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        gate_TK = score_TK
        if self.top_k > 1 and self.normalize_topk:
            gate_TK = score_TK / score_TK.sum(-1, keepdim=True)
        return Routing(
            expert_idx_TK=expert_idx_TK,
            gate_TK=gate_TK,
            score_TK=score_TK.detach(),
            aux_loss=load_balance_loss(probs_TE, expert_idx_TK),
            z_loss=router_z_loss(logits_TE),
        )
