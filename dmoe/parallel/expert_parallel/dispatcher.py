"""Expert-parallel dispatcher: the local dispatcher plus an all-to-all on each side.

Shape legend: T tokens, D model dim, E global experts, L local experts (E / ep),
S source ranks (= ep), N rows.

EP rank r owns the global experts `dmoe.parallel.layout.expert_range(r, ep, E)`, the
contiguous block [r*L, (r+1)*L). The `Dispatcher` protocol of dmoe.moe.dispatcher:
    x_ND, meta = dispatcher.dispatch(x_TD, routing, training)  # rows of MY local experts
    y_TD = dispatcher.combine(y_ND, meta)
Communication: dispatch does two all-to-alls (per-expert counts, then rows), combine does
one (rows back); backward repeats the row all-to-alls in reverse. Host syncs: one
`.tolist()` of the exchanged counts per forward; no
bincount, boolean mask or unsized repeat_interleave on the way. Every rank of the EP
group must call dispatch and combine for every layer, even with no tokens, and ranks must
agree on whether they backpropagate (the backward all-to-alls are collectives too).

Capacity is computed from this rank's own tokens against the E global experts (as
DeepSpeed does), so an expert may receive up to ep * capacity rows in total.

`meta` fields: `counts` = rows per LOCAL expert (what the experts need); `routed_E`,
`kept_E`, `capacity` = this rank's tokens against the E global experts; `token_idx_N`,
`gate_N` = this rank's kept (token, expert) pairs in global-expert order, i.e. the rows
*sent*, which `combine` scatters back. `meta` is an `AllToAllMeta`: a DispatchMeta plus
the splits and the regrouping index of this call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dmoe.moe.dispatcher import (
    CapacitySettings,
    DispatchMeta,
    combine_rows,
    permute_tokens,
)
from dmoe.moe.router import Routing
from dmoe.parallel import comm_trace
from dmoe.parallel.comm_trace import CommTag
from dmoe.parallel.layout import expert_range

from .all_to_all import all_to_all


@dataclass(frozen=True)
class AllToAllMeta(DispatchMeta):
    send_splits: list[int]  # rows this rank sends to each EP rank
    recv_splits: list[int]  # rows this rank receives from each EP rank
    recv_counts_SL: torch.Tensor  # rows received from source s for local expert l
    sort_N: torch.Tensor  # received (source, expert) order -> local-expert-contiguous order
    unsort_N: torch.Tensor  # inverse of sort_N
    out_dtype: torch.dtype | None = None  # the tokens' dtype: combine returns rows in it


def wire_dtype(x: torch.Tensor) -> torch.Tensor:
    """Rows as the all-to-all sends them: in autocast's dtype when autocast is on (the experts
    compute in it anyway), so a bf16 run moves half the bytes of its fp32 residual stream."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def local_expert_order(counts_SL: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Index that regroups rows stacked by (source, local expert) into (local expert, source).

    Rows of one (source, expert) block keep their order, so the experts see each source's
    rows in that source's priority order. `total` (the rows, known on the host) spares
    repeat_interleave a host sync to size its output.
    """
    num_sources, num_local = counts_SL.shape
    block_N = torch.repeat_interleave(
        torch.arange(num_sources * num_local, device=counts_SL.device), counts_SL.reshape(-1),
        output_size=total,
    )
    source_N, expert_N = block_N // num_local, block_N % num_local
    return torch.argsort(expert_N * num_sources + source_N, stable=True)


class ExpertParallelDispatcher:
    """What both EP dispatchers share: the group, expert ownership, the layer's comm tags."""

    def __init__(self, num_experts: int, capacity: CapacitySettings,
                 ep_group: dist.ProcessGroup | None = None):
        ep = dist.get_world_size(ep_group)
        self.num_experts, self.capacity, self.ep_group = num_experts, capacity, ep_group
        self.ep, self.num_local = ep, len(expert_range(0, ep, num_experts))
        self.layer_id: int | None = None  # names this layer's comm events

    def set_layer_id(self, layer_id: int) -> None:
        self.layer_id = layer_id

    def _tag(self, name: str) -> CommTag:
        return CommTag(name, self.layer_id)


class AllToAllDispatcher(ExpertParallelDispatcher):
    """Sends each kept row to the EP rank that owns its expert, and brings it back."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, training: bool
                 ) -> tuple[torch.Tensor, AllToAllMeta]:
        num_tokens = x_TD.shape[0]
        # 1. Local capacity plan on this rank's tokens: kept rows in global-expert order.
        plan, token_idx_N, gate_N, cap = permute_tokens(
            routing, num_tokens, self.num_experts, self.capacity, training, compact=False
        )
        # 2. Exchange per-expert counts: send_SL[j, l] rows go to rank j's local expert l;
        #    recv_SL[s, l] rows arrive from rank s for my local expert l.
        send_SL = plan.counts_E.reshape(self.ep, self.num_local)
        recv_SL = torch.empty_like(send_SL)
        comm_trace.all_to_all_single(recv_SL, send_SL.contiguous(), group=self.ep_group,
                                     tag=self._tag("a2a_counts"))
        ep = self.ep
        flat = torch.cat([send_SL.sum(1), recv_SL.sum(1), recv_SL.sum(0)]).tolist()  # the one host sync
        send_splits, recv_splits, counts_L = flat[:ep], flat[ep:2 * ep], flat[2 * ep:]
        kept = sum(send_splits)  # kept rows come first in the uncompacted order
        token_idx_N, gate_N = token_idx_N[:kept], gate_N[:kept]
        # 3. Rows to their owners (uneven splits; zero rows either way is fine).
        x_recv_ND = all_to_all(
            wire_dtype(x_TD.index_select(0, token_idx_N)), recv_splits, send_splits, self.ep_group,
            self._tag("a2a_dispatch"),
        )
        # 4. (source, local expert) order -> local-expert-contiguous order.
        sort_N = local_expert_order(recv_SL, sum(recv_splits))
        meta = AllToAllMeta(
            token_idx_N=token_idx_N,
            gate_N=gate_N,
            counts=counts_L,
            routed_E=plan.routed_E,
            kept_E=plan.counts_E,
            capacity=cap,
            num_tokens=num_tokens,
            send_splits=send_splits,
            recv_splits=recv_splits,
            recv_counts_SL=recv_SL,
            sort_N=sort_N,
            unsort_N=torch.argsort(sort_N),
            out_dtype=x_TD.dtype,
        )
        # 5. The experts run outside the dispatcher on these rows.
        return x_recv_ND.index_select(0, sort_N), meta

    def combine(self, y_ND: torch.Tensor, meta: AllToAllMeta) -> torch.Tensor:
        # 6. Inverse reorder: back to (source, local expert) order.
        y_recv_ND = y_ND.index_select(0, meta.unsort_N)
        # 7. Rows back to the ranks their tokens came from (splits swapped).
        y_sent_ND = all_to_all(wire_dtype(y_recv_ND), meta.send_splits, meta.recv_splits,
                               self.ep_group, self._tag("a2a_combine"))
        if meta.out_dtype is not None:
            y_sent_ND = y_sent_ND.to(meta.out_dtype)  # the weighted sum in the tokens' dtype
        # 8. Gate-weighted sum per token, as in the local dispatcher.
        return combine_rows(y_sent_ND, meta.token_idx_N, meta.gate_N, meta.num_tokens)
