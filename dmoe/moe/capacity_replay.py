"""What a capacity factor would drop, from recorded routing: pure functions, no retraining.

Shape legend: R routing records (one rank's one micro-batch forward), L MoE layers,
E experts, F capacity factors.

Every dispatcher keeps min(routed_e, capacity) rows of expert e (whatever the drop policy
chooses *which* rows), with capacity from `expert_capacity` over the tokens of that one
forward on that one rank. So for recorded per-expert counts, the drops at any factor are

    dropped = sum_e max(0, routed_e - capacity(T, factor))

exact for the routing that was recorded. Caveat when replaying a whole model: a layer's
drops change the next layer's input, so deeper layers route slightly differently at
another factor; the first MoE layer (and any replayed routing) is exact.
"""
from __future__ import annotations

import torch

from dmoe.parallel.layout import expert_owner

from .capacity import expert_capacity


def tokens_of(routed_RLE: torch.Tensor, top_k: int) -> torch.Tensor:
    """Tokens per forward: every token makes exactly top_k assignments to distinct experts."""
    return routed_RLE.sum(-1) // top_k


def kept_rows(routed_RLE: torch.Tensor, top_k: int, factor: float | None,
              min_capacity: int = 0) -> torch.Tensor:
    """[R, L, E] rows each expert keeps at `factor` (dropless: all routed rows)."""
    num_experts = routed_RLE.shape[-1]
    tokens_RL = tokens_of(routed_RLE, top_k)
    caps = [[expert_capacity(int(t), num_experts, top_k, factor, min_capacity) for t in row]
            for row in tokens_RL.tolist()]
    if caps and caps[0] and caps[0][0] is None:
        return routed_RLE.clone()
    cap_RL1 = torch.tensor(caps, dtype=routed_RLE.dtype).unsqueeze(-1)
    return torch.minimum(routed_RLE, cap_RL1)


def drop_fractions(routed_RLE: torch.Tensor, top_k: int, factors: list[float | None],
                   min_capacity: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-layer [F, L], overall [F]) dropped / routed assignments at each factor."""
    routed_L = routed_RLE.sum((0, 2)).double()
    per_layer, overall = [], []
    for factor in factors:
        kept_L = kept_rows(routed_RLE, top_k, factor, min_capacity).sum((0, 2)).double()
        per_layer.append(1 - kept_L / routed_L.clamp(min=1))
        overall.append(1 - kept_L.sum() / routed_L.sum().clamp(min=1))
    return torch.stack(per_layer), torch.stack(overall)


def offrank_rows(kept_RLE: torch.Tensor, ep_index_R: torch.Tensor, ep: int) -> torch.Tensor:
    """[R, L] kept rows whose expert lives on another EP rank (what the all-to-all moves)."""
    owner_E = expert_owner(kept_RLE.shape[-1], ep)
    remote_RE = owner_E.unsqueeze(0) != ep_index_R.unsqueeze(1)
    return (kept_RLE * remote_RE.unsqueeze(1)).sum(-1)


def smallest_factor(factors: list[float], overall: torch.Tensor, target: float) -> float | None:
    """The smallest factor whose overall drop fraction is at most `target` (None: none is)."""
    ok = [f for f, d in zip(factors, overall.tolist()) if d <= target]
    return min(ok) if ok else None
