"""Token dispatchers: (token, expert) pairs to expert-contiguous rows and back.

Shape legend: T tokens, D model dim, E experts, K top-k, N kept (token, expert) rows.

Every dispatcher implements the `Dispatcher` protocol:
    x_ND, meta = dispatcher.dispatch(x_TD, routing, training)  # rows grouped by local expert
    y_TD = dispatcher.combine(y_ND, meta)                      # gate-weighted sum per token
    dispatcher.set_layer_id(i)                                 # names its comm events (profiling)
`meta` is a frozen `DispatchMeta` (or a subclass carrying the dispatcher's own state);
`meta.counts` (a Python list) tells the experts how many rows each local expert owns.
The local dispatcher does no communication; the expert-parallel one
(dmoe.parallel.expert_parallel.dispatcher) adds an all-to-all on each side behind the
same interface.

No dense one-hot [T, E, C] tensor is built: the permutation is an index vector from one
stable sort, so cost grows with T*K, not T*E*C, and dropped rows are never computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch
from torch.autograd.function import once_differentiable

from .capacity import CapacityPlan, expert_capacity, plan_capacity
from .router import Routing


@dataclass(frozen=True)
class CapacitySettings:
    """Expert capacity (the config's moe.* fields; defaults as there). A factor of None or 0:
    dropless."""

    train_factor: float | None = 1.25
    eval_factor: float | None = 2.0
    min_capacity: int = 4
    drop_policy: str = "position"

    def factor(self, training: bool) -> float | None:
        return self.train_factor if training else self.eval_factor


@dataclass(frozen=True)
class DispatchMeta:
    token_idx_N: torch.Tensor  # source token of each kept row, expert-contiguous
    gate_N: torch.Tensor  # combine weight of each kept row (differentiable)
    counts: list[int]  # rows per local expert, in row order
    routed_E: torch.Tensor  # rows routed per (global) expert before dropping
    kept_E: torch.Tensor  # rows kept per (global) expert
    capacity: int | None
    num_tokens: int


MetaT = TypeVar("MetaT", bound=DispatchMeta)


class Dispatcher(Protocol, Generic[MetaT]):
    """Moves (token, expert) rows to the experts and back; see the module doc."""

    capacity: CapacitySettings

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, training: bool
                 ) -> tuple[torch.Tensor, MetaT]: ...

    def combine(self, y_ND: torch.Tensor, meta: MetaT) -> torch.Tensor: ...

    def set_layer_id(self, layer_id: int) -> None: ...


# Host synchronisations of the dispatchers (reads of device values into Python): one
# `.tolist()` per MoE layer forward (the rows per expert after the count exchange, which
# size the all-to-alls and the experts' row blocks); none in backward
# (tests/distributed/test_dispatch_host_syncs.py counts them).


def permute_tokens(
    routing: Routing, num_tokens: int, num_experts: int, capacity: CapacitySettings, training: bool,
    compact: bool = True,
) -> tuple[CapacityPlan, torch.Tensor, torch.Tensor, int | None]:
    """The local half of every dispatcher: capacity plan, source tokens and gates of kept rows.

    compact=False: every assignment, kept ones first (see plan_capacity); no host sync."""
    top_k = routing.expert_idx_TK.shape[1]
    cap = expert_capacity(
        num_tokens, num_experts, top_k, capacity.factor(training), capacity.min_capacity
    )
    # k-major flattening: assignment n = k * T + t (first choices take priority).
    expert_idx_N = routing.expert_idx_TK.t().reshape(-1)
    score_N = routing.score_TK.t().reshape(-1)
    plan = plan_capacity(expert_idx_N, score_N, num_experts, cap, capacity.drop_policy, compact)
    token_idx_N = plan.order_N % num_tokens
    gate_N = routing.gate_TK.t().reshape(-1).index_select(0, plan.order_N)
    return plan, token_idx_N, gate_N, cap


_COMBINE_BLOCK_BYTES = 512 * 1024  # one block of weighted rows stays in a core's L2


def combine_block_rows(n_rows: int, row_bytes: int, device_type: str) -> int:
    """Rows per block of the combine: an L2-sized block on CPU; every row at once elsewhere
    (on CUDA 32-row blocks at D=4096 bf16 would be thousands of kernel launches a layer)."""
    if device_type != "cpu":
        return max(1, n_rows)
    return max(1, _COMBINE_BLOCK_BYTES // max(1, row_bytes))


class _WeightedIndexAdd(torch.autograd.Function):
    """out_TD = zeros.index_add_(0, token_idx_N, y_ND * gate_N[:, None]), a row block at a time.

    Bit-for-bit what autograd computes for that expression (rows accumulate in the same
    order; each gate gradient is the same per-row sum), but the [N, D] products in forward
    and backward never exist whole: measured 2x faster on CPU at N=8192, D=256.
    """

    @staticmethod
    def forward(ctx, y_ND, gate_N, token_idx_N, num_tokens):
        out_TD = y_ND.new_zeros(num_tokens, y_ND.shape[1])
        block = combine_block_rows(y_ND.shape[0], y_ND.shape[1] * y_ND.element_size(),
                                   y_ND.device.type)
        for start in range(0, y_ND.shape[0], block):
            rows = slice(start, start + block)
            out_TD.index_add_(0, token_idx_N[rows], y_ND[rows] * gate_N[rows, None])
        ctx.save_for_backward(y_ND, gate_N, token_idx_N)
        ctx.block = block
        return out_TD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD):
        y_ND, gate_N, token_idx_N = ctx.saved_tensors
        need_y, need_gate = ctx.needs_input_grad[:2]
        grad_y = grad_TD.index_select(0, token_idx_N)
        grad_gate = torch.empty_like(gate_N) if need_gate else None
        for start in range(0, y_ND.shape[0], ctx.block):
            rows = slice(start, start + ctx.block)
            if need_gate:
                torch.sum(grad_y[rows] * y_ND[rows], dim=1, out=grad_gate[rows])
            grad_y[rows].mul_(gate_N[rows, None])
        return (grad_y if need_y else None), grad_gate, None, None


def combine_rows(y_ND: torch.Tensor, token_idx_N: torch.Tensor, gate_N: torch.Tensor,
                 num_tokens: int) -> torch.Tensor:
    """y_TD[t] = sum of gate * y over the kept rows of token t (dropped rows add nothing)."""
    return _WeightedIndexAdd.apply(y_ND, gate_N.to(y_ND.dtype), token_idx_N, num_tokens)


class LocalDispatcher:
    """All experts on this rank: a gather before the experts, a scatter-add after.

    It also offers `dispatch_combine` (fuses_experts): the gather, the experts and the
    combine as one call, so the experts can read their rows straight from x_TD and add
    their gate-weighted outputs straight into y_TD (GroupedExperts.forward with token_idx_N
    and gate_N, routed_mlp.py); MoELayer takes it when offered. dispatch()/combine() stay
    as they are (expert parallelism and any experts without `takes_routed_rows` use them)."""

    fuses_experts = True

    def __init__(self, num_experts: int, capacity: CapacitySettings):
        self.num_experts, self.capacity = num_experts, capacity

    def set_layer_id(self, layer_id: int) -> None:
        """No communication to name."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, training: bool
                 ) -> tuple[torch.Tensor, DispatchMeta]:
        meta = self.plan(x_TD, routing, training)
        return x_TD.index_select(0, meta.token_idx_N), meta

    def dispatch_combine(self, x_TD: torch.Tensor, routing: Routing, training: bool, experts
                         ) -> tuple[torch.Tensor, DispatchMeta]:
        """combine(experts(*dispatch(...))) in one: y_TD and the metadata."""
        meta = self.plan(x_TD, routing, training)
        if getattr(experts, "takes_routed_rows", False):
            return experts(x_TD, meta.counts, meta.token_idx_N, meta.gate_N), meta
        y_ND = experts(x_TD.index_select(0, meta.token_idx_N), meta.counts)
        return self.combine(y_ND, meta), meta

    def plan(self, x_TD: torch.Tensor, routing: Routing, training: bool) -> DispatchMeta:
        """Which rows go where (kept rows in expert order, their gates, counts): no rows move."""
        num_tokens = x_TD.shape[0]
        plan, token_idx_N, gate_N, cap = permute_tokens(
            routing, num_tokens, self.num_experts, self.capacity, training, compact=False
        )
        counts = plan.counts_E.tolist()  # the one host sync
        kept = sum(counts)
        token_idx_N, gate_N = token_idx_N[:kept], gate_N[:kept]
        meta = DispatchMeta(
            token_idx_N=token_idx_N,
            gate_N=gate_N,
            counts=counts,
            routed_E=plan.routed_E,
            kept_E=plan.counts_E,
            capacity=cap,
            num_tokens=num_tokens,
        )
        return meta

    def combine(self, y_ND: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        return combine_rows(y_ND, meta.token_idx_N, meta.gate_N, meta.num_tokens)
