"""Capacity math and drop decisions: pure functions, no process groups, no modules.

Shape legend: T tokens, K top-k, E experts, N = T*K (token, expert) assignments.

Assignments are numbered k-major: n = k * T + t, so every token's first choice ranks
ahead of any token's second choice (GShard / DeepSpeed priority), and within one choice
rank earlier tokens come first (the "position" policy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DROP_POLICIES = ("position", "probability")


def expert_capacity(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    capacity_factor: float | None,
    min_capacity: int = 0,
) -> int | None:
    """Rows each expert may take: ceil(k * tokens / experts * factor), at least min_capacity.

    Returns None in dropless mode (factor None or <= 0), where every assignment is kept.
    """
    if capacity_factor is None or capacity_factor <= 0:
        return None
    capacity = math.ceil(top_k * num_tokens / num_experts * capacity_factor)
    return max(capacity, min_capacity)


@dataclass(frozen=True)
class CapacityPlan:
    """Which assignments survive capacity, in expert-contiguous order.

    order_N:        assignment ids (k-major) of the kept rows, grouped by expert, priority
                    order inside each expert.
    counts_E:       kept rows per expert (sums to len(order_N)).
    routed_E:       rows routed per expert before dropping.
    """

    order_N: torch.Tensor
    counts_E: torch.Tensor
    routed_E: torch.Tensor

    @property
    def num_dropped(self) -> torch.Tensor:
        return self.routed_E.sum() - self.counts_E.sum()


def count_per_expert(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """bincount(expert_idx, minlength=num_experts) without its host sync on CUDA (bincount
    reads the maximum back to size its output); expert ids must be < num_experts."""
    flat = expert_idx.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat.long(), torch.ones_like(flat, dtype=torch.int64))


def plan_capacity(
    expert_idx_N: torch.Tensor,
    score_N: torch.Tensor,
    num_experts: int,
    capacity: int | None,
    policy: str = "position",
    compact: bool = True,
) -> CapacityPlan:
    """Group assignments by expert and drop those past `capacity` under `policy`.

    position:    first come, first served in k-major assignment order.
    probability: inside each expert, the lowest router scores are dropped first.
    compact=False keeps every assignment in order_N, the kept ones first (expert-contiguous,
    as with compact=True) and the dropped ones after: its shape does not depend on the data,
    so nothing waits for the device; order_N[:counts_E.sum()] is the compact order.
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"moe.drop_policy ({policy!r}) must be one of {DROP_POLICIES}")
    if policy == "probability" and capacity is not None:
        by_score = torch.argsort(score_N, descending=True, stable=True)
        order = by_score[torch.argsort(expert_idx_N[by_score], stable=True)]
    else:
        order = torch.argsort(expert_idx_N, stable=True)
    routed_E = count_per_expert(expert_idx_N, num_experts)
    if capacity is None:
        return CapacityPlan(order, routed_E, routed_E)
    starts_E = torch.cumsum(routed_E, 0) - routed_E
    sorted_expert = expert_idx_N.index_select(0, order)
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts_E[sorted_expert]
    keep = rank_in_expert < capacity
    if compact:
        return CapacityPlan(order[keep], routed_E.clamp(max=capacity), routed_E)
    kept_first = torch.argsort(torch.logical_not(keep).to(torch.uint8), stable=True)
    return CapacityPlan(order.index_select(0, kept_first), routed_E.clamp(max=capacity), routed_E)
