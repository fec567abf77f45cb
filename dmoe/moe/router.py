"""Token-choice top-k router over a linear gate.

Shape legend: T tokens, D model dim, E experts, K top-k, G expert groups, B sequences,
S tokens per sequence (T = B*S).

The router computes in at least float32 whatever the activation dtype, returns the chosen experts
and their gate weights, and three auxiliary losses as tensors for the training loop to weight
and add: Switch/GShard load balance (batch-wise), DeepSeek-V3 sequence-wise balance and
ST-MoE router z-loss.

Options (DeepSeek-V3 style routing, all off by default):
- score_func "sigmoid": each expert scored on its own by sigmoid(logit) instead of a softmax
  over experts; the balance losses then use the scores normalised to sum 1 per token.
- num_groups / topk_groups: group-limited routing; a token picks its experts only inside its
  `topk_groups` best groups of contiguous experts.
- route_scale: multiplies the final gates.
- normalize_topk renormalises the chosen scores to sum 1 only when K > 1, for either score
  function: a K=1 gate of constant 1 would give the router no gradient through the output.
- bias_update_rate > 0: auxiliary-loss-free balancing (DeepSeek-V3). The router keeps a
  per-expert `expert_bias` (a parameter without gradient, so checkpoints carry it) that is
  added to the scores for the choice only, never the gates; after every optimizer step the
  training step moves it by `update_expert_bias` from that step's global per-expert counts.
- The router runs with autocast off: under bf16 autocast a bf16 gate matmul changes which
  experts tokens choose.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .capacity import count_per_expert

SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class Routing:
    expert_idx_TK: torch.Tensor  # int64
    gate_TK: torch.Tensor  # float32, differentiable, weights used in combine
    score_TK: torch.Tensor  # float32 router score of each choice, unbiased (for drop policy)
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    seq_aux_loss: torch.Tensor


def load_balance_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor) -> torch.Tensor:
    """Switch/GShard loss E * sum_e f_e * P_e, f_e the share of assignments routed to e.

    Equals 1 under perfectly uniform routing; f_e carries no gradient, P_e does.
    """
    num_experts = probs_TE.shape[-1]
    counts_E = count_per_expert(expert_idx_TK, num_experts)  # no host sync
    frac_E = counts_E.to(probs_TE.dtype) / max(expert_idx_TK.numel(), 1)
    mean_prob_E = probs_TE.sum(0) / max(probs_TE.shape[0], 1)  # 0 tokens: 0, not NaN
    return num_experts * torch.dot(frac_E, mean_prob_E)


def sequence_balance_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor,
                          seq_len: int | None) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, the mean over sequences of sum_e f_e * P_e.

    Per sequence of S tokens f_e = E / (K*S) * (its assignments to e), without gradient, and
    P_e its tokens' mean normalised score. Balances each sequence, not just the batch, so no
    single sequence can pile onto a few experts. seq_len None: all T tokens are one sequence.
    """
    num_tokens, num_experts = probs_TE.shape
    top_k = expert_idx_TK.shape[-1]
    if num_tokens == 0:
        return probs_TE.new_zeros(())
    seq_len = num_tokens if seq_len is None else seq_len
    if seq_len < 1 or num_tokens % seq_len:
        raise ValueError(f"router tokens ({num_tokens}) must be a multiple of seq_len ({seq_len})")
    num_seqs = num_tokens // seq_len
    idx_BN = expert_idx_TK.reshape(num_seqs, seq_len * top_k)
    counts_BE = probs_TE.new_zeros(num_seqs, num_experts)
    counts_BE.scatter_add_(1, idx_BN, torch.ones_like(idx_BN, dtype=probs_TE.dtype))
    frac_BE = counts_BE * (num_experts / (top_k * seq_len))
    mean_prob_BE = probs_TE.reshape(num_seqs, seq_len, num_experts).mean(1)
    return (frac_BE * mean_prob_BE).sum(-1).mean()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-sum-exp of the router logits."""
    return torch.logsumexp(logits_TE, dim=-1).square().sum() / max(logits_TE.shape[0], 1)


def expert_scores(logits_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """Per-expert scores: a softmax over experts, or an independent sigmoid per expert."""
    if score_func == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(logits_TE)
    raise ValueError(f"moe.score_func ({score_func!r}) must be one of {list(SCORE_FUNCS)}")


def normalized_scores(scores_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """Scores as a distribution over experts (what the balance losses average).

    Softmax probabilities already are one; sigmoid scores are divided by their sum per token.
    """
    if score_func == "softmax":
        return scores_TE
    return scores_TE / scores_TE.sum(-1, keepdim=True)


def restrict_to_groups(choice_TE: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """`choice_TE` with the experts outside each token's `topk_groups` best groups at -inf.

    A group's score is the sum of its two highest choice scores (its only score if it holds
    one expert): the DeepSeek-V3 rule, which limits how many groups (devices) a token reaches.
    """
    if topk_groups >= num_groups:
        return choice_TE
    num_tokens, num_experts = choice_TE.shape
    per_group = num_experts // num_groups
    choice_TGe = choice_TE.reshape(num_tokens, num_groups, per_group)
    group_score_TG = choice_TGe.topk(min(2, per_group), dim=-1).values.sum(-1)
    keep_group_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
    keep_group_TG.scatter_(1, group_score_TG.topk(topk_groups, dim=-1).indices, True)
    keep_TE = keep_group_TG.unsqueeze(-1).expand_as(choice_TGe).reshape(num_tokens, num_experts)
    return choice_TE.masked_fill(~keep_TE, float("-inf"))


def select_experts(scores_TE: torch.Tensor, top_k: int, num_groups: int = 1, topk_groups: int = 1,
                   choice_bias_E: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's top-k experts by `scores + choice_bias_E`, inside its best groups.

    The bias (loss-free balancing) moves only the choice; the caller takes gates from the
    unbiased scores. Returns expert_idx_TK (int64, no gradient).
    """
    with torch.no_grad():
        choice_TE = scores_TE if choice_bias_E is None else scores_TE + choice_bias_E
        choice_TE = restrict_to_groups(choice_TE, num_groups, topk_groups)
        return choice_TE.topk(top_k, dim=-1).indices


def check_groups(num_experts: int, top_k: int, num_groups: int, topk_groups: int) -> None:
    """The group-limited routing constraints, one-line errors naming the config fields."""
    if num_groups < 1:
        raise ValueError(f"moe.num_groups ({num_groups}) must be >= 1")
    if num_experts % num_groups:
        raise ValueError(f"moe.num_experts ({num_experts}) must be divisible by "
                         f"moe.num_groups ({num_groups})")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"moe.topk_groups ({topk_groups}) must be in [1, moe.num_groups "
                         f"({num_groups})]")
    reachable = topk_groups * (num_experts // num_groups)
    if top_k > reachable:
        raise ValueError(f"moe.top_k ({top_k}) must be <= moe.topk_groups ({topk_groups}) * "
                         f"moe.num_experts ({num_experts}) / moe.num_groups ({num_groups}) "
                         f"= {reachable}")


class TopKRouter(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        jitter_eps: float = 0.0,
        normalize_topk: bool = True,
        score_func: str = "softmax",
        route_scale: float = 1.0,
        num_groups: int = 1,
        topk_groups: int = 1,
        bias_update_rate: float = 0.0,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"moe.top_k ({top_k}) must be in [1, moe.num_experts ({num_experts})]")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"moe.score_func ({score_func!r}) must be one of {list(SCORE_FUNCS)}")
        check_groups(num_experts, top_k, num_groups, topk_groups)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.num_experts, self.top_k = num_experts, top_k
        self.jitter_eps, self.normalize_topk = jitter_eps, normalize_topk
        self.score_func, self.route_scale = score_func, route_scale
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.bias_update_rate = bias_update_rate
        self.expert_bias = None
        if bias_update_rate > 0:
            self.expert_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> Routing:
        """Route T tokens; `seq_len` splits them into sequences for the sequence-wise loss.

        seq_len None: the T tokens count as one sequence (a TP token slice, a 2-D input).
        """
        with torch.autocast(x_TD.device.type, enabled=False):
            return self._route(x_TD, seq_len)

    def _route(self, x_TD: torch.Tensor, seq_len: int | None) -> Routing:
        if self.training and self.jitter_eps > 0:
            noise = torch.empty_like(x_TD).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
            x_TD = x_TD * noise
        dtype = torch.promote_types(x_TD.dtype, torch.float32)  # at least fp32
        logits_TE = F.linear(x_TD.to(dtype), self.gate.weight.to(dtype))
        scores_TE = expert_scores(logits_TE, self.score_func)
        bias_E = None if self.expert_bias is None else self.expert_bias.to(dtype)
        expert_idx_TK = select_experts(scores_TE, self.top_k, self.num_groups, self.topk_groups,
                                       bias_E)
        score_TK = scores_TE.gather(1, expert_idx_TK)
        gate_TK = score_TK
        if self.top_k > 1 and self.normalize_topk:
            gate_TK = score_TK / score_TK.sum(-1, keepdim=True)
        if self.route_scale != 1.0:
            gate_TK = gate_TK * self.route_scale
        probs_TE = normalized_scores(scores_TE, self.score_func)
        return Routing(
            expert_idx_TK=expert_idx_TK,
            gate_TK=gate_TK,
            score_TK=score_TK.detach(),
            aux_loss=load_balance_loss(probs_TE, expert_idx_TK),
            z_loss=router_z_loss(logits_TE),
            seq_aux_loss=sequence_balance_loss(probs_TE, expert_idx_TK, seq_len),
        )


@torch.no_grad()
def update_expert_bias(bias_E: torch.Tensor, routed_E: torch.Tensor, rate: float) -> None:
    """Loss-free balancing step: bias_e += rate * sign(mean load - load_e), from one
    optimizer step's per-expert routed counts summed over every rank holding the layer
    (so every rank applies the same update). Under-loaded experts become likelier picks."""
    load_E = routed_E.to(torch.float64)
    bias_E.add_((rate * torch.sign(load_E.mean() - load_E)).to(bias_E.dtype))
