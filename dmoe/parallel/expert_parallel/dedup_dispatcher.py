"""Expert-parallel dispatcher that sends each token once per EP rank (parallel.a2a_dedup).

Shape legend: T tokens, D model dim, E global experts, L local experts (E / ep), S source
ranks (= ep), N kept (token, expert) rows, U unique (token, destination rank) rows.

The plain AllToAllDispatcher sends one row per kept (token, expert) pair. Here a token
whose experts include several on one EP rank sends its row there once, with the list of
(local expert, gate) pairs it chose there; that rank runs each chosen expert on it and
returns one gate-weighted sum. So each direction moves U rows instead of N: with top-k
routing over E/ep experts per rank U < N whenever a token picks two experts on one rank,
and with group-limited routing where moe.num_groups == parallel.ep, U <= topk_groups * T.

Same `Dispatcher` protocol and ownership (dmoe.parallel.layout.expert_range) as the plain
dispatcher; capacity is decided per (token, expert) on the sending rank exactly as there.
Communication, forward (numbered as in `dispatch`): (2) counts [S, L+1] int plus the
checked header (dispatcher.HEADER), (3) U token
rows, (4) N row indices int, (5) N gates; combine (7) U result rows back. Backward: the
row, gate and result all-to-alls in reverse. Host syncs: one `.tolist()` of the counts;
the unique rows are found with a sort and a cumsum over
all assignments (no torch.unique, bincount or boolean mask, which read sizes back).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dmoe.moe.dispatcher import (
    DispatchMeta,
    combine_rows,
    permute_tokens,
)
from dmoe.moe.router import Routing
from dmoe.parallel import comm_trace

from .all_to_all import all_to_all
from .dispatcher import ExpertParallelDispatcher, local_expert_order, wire_dtype


@dataclass(frozen=True)
class DedupMeta(DispatchMeta):
    send_u: list[int]  # unique token rows this rank sends to each EP rank
    recv_u: list[int]  # unique token rows it receives from each EP rank
    token_U: torch.Tensor  # this rank's token behind each sent unique row
    row_u_idx_N: torch.Tensor  # per expert row (local-expert order): its received unique row
    gate_recv_N: torch.Tensor  # per expert row (local-expert order): its gate (differentiable)
    out_dtype: torch.dtype | None = None  # the tokens' dtype: combine returns rows in it


class DedupAllToAllDispatcher(ExpertParallelDispatcher):
    """One row per (token, destination rank) each way; see the module doc."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, training: bool
                 ) -> tuple[torch.Tensor, DedupMeta]:
        T, L = x_TD.shape[0], self.num_local
        # 1. Capacity plan on this rank's tokens (kept rows in global-expert order), then
        #    the unique (destination, token) pairs, destination-major.
        plan, token_idx_N, gate_N, cap = permute_tokens(routing, T, self.num_experts,
                                                        self.capacity, training, compact=False)
        N_all, ep = token_idx_N.shape[0], self.ep
        expert_N = routing.expert_idx_TK.t().reshape(-1).index_select(0, plan.order_N)
        owner_N = expert_N // L
        # unique (owner, token) keys among the kept rows (the first counts_E.sum() of the
        # uncompacted order); dropped rows get a key past every real one
        kept_mask = torch.arange(N_all, device=x_TD.device) < plan.counts_E.sum()
        sentinel = ep * T
        key_N = torch.where(kept_mask, owner_N * T + token_idx_N, sentinel)
        key_sorted, perm = torch.sort(key_N, stable=True)
        first = torch.ones_like(key_sorted, dtype=torch.bool)
        first[1:] = key_sorted[1:] != key_sorted[:-1]
        first &= key_sorted < sentinel
        u_sorted = torch.cumsum(first, 0) - 1  # unique-row index of each sorted row
        inverse_N = torch.empty_like(u_sorted).scatter_(0, perm, u_sorted)
        send_u_S = torch.zeros(ep + 1, dtype=torch.int64, device=x_TD.device).scatter_add_(
            0, key_sorted // T, first.long())[:ep]
        first_u_S = torch.cumsum(send_u_S, 0) - send_u_S
        local_u_N = inverse_N - first_u_S[owner_N.clamp(max=ep - 1)]  # index in the destination's block
        # 2. Counts: per destination, rows per local expert and unique token rows.
        #    (exchange_counts checks the peers' headers and does the one host sync)
        send_SX = torch.cat([plan.counts_E.reshape(ep, L), send_u_S.unsqueeze(1)], 1)
        recv_SX, send_rows, recv_rows = self.exchange_counts(send_SX, x_TD)
        recv_SL = recv_SX[:, :L]
        send_n, send_u = [sum(r[:L]) for r in send_rows], [r[L] for r in send_rows]
        recv_n, recv_u = [sum(r[:L]) for r in recv_rows], [r[L] for r in recv_rows]
        counts_L = [sum(r[l] for r in recv_rows) for l in range(L)]
        kept, U = sum(send_n), sum(send_u)
        token_idx_N, gate_N, local_u_N = token_idx_N[:kept], gate_N[:kept], local_u_N[:kept]
        # the token of each unique row: the first sorted row of each key writes it (the
        # other rows write to a spare slot U, dropped)
        token_U = torch.empty(U + 1, dtype=key_sorted.dtype, device=x_TD.device).scatter_(
            0, torch.where(first, u_sorted, U), key_sorted % T)[:U]
        # 3. Token rows, once per destination.
        x_recv_UD = all_to_all(wire_dtype(x_TD.index_select(0, token_U)), recv_u, send_u, self.ep_group,
                               self._tag("a2a_dispatch"))
        # 4. For every (token, expert) row, which of the received token rows it reads.
        local_u_recv_N = local_u_N.new_empty(sum(recv_n))
        comm_trace.all_to_all_single(local_u_recv_N, local_u_N.contiguous(), recv_n, send_n,
                                     group=self.ep_group, tag=self._tag("a2a_dispatch_index"))
        # 5. Gates travel with them (their gradients come back in backward).
        gate_recv_N = all_to_all(gate_N, recv_n, send_n, self.ep_group, self._tag("a2a_gates"))
        # 6. Rows in local-expert-contiguous order, each read from its received token row.
        source_N = torch.repeat_interleave(torch.arange(self.ep, device=x_TD.device),
                                           torch.tensor(recv_n, device=x_TD.device),
                                           output_size=sum(recv_n))
        first_recv_S = torch.tensor([0] + recv_u[:-1], device=x_TD.device).cumsum(0)
        sort_N = local_expert_order(recv_SL, sum(recv_n))
        row_u_idx_N = (first_recv_S[source_N] + local_u_recv_N).index_select(0, sort_N)
        meta = DedupMeta(
            token_idx_N=token_idx_N, gate_N=gate_N, counts=counts_L,
            routed_E=plan.routed_E, kept_E=plan.counts_E, capacity=cap, num_tokens=T,
            send_u=send_u, recv_u=recv_u, token_U=token_U, row_u_idx_N=row_u_idx_N,
            gate_recv_N=gate_recv_N.index_select(0, sort_N), out_dtype=x_TD.dtype,
        )
        return x_recv_UD.index_select(0, row_u_idx_N), meta

    def combine(self, y_ND: torch.Tensor, meta: DedupMeta) -> torch.Tensor:
        # 7. Gate-weighted sum per received token row on the expert side, then one row back.
        y_recv_UD = combine_rows(y_ND, meta.row_u_idx_N, meta.gate_recv_N, sum(meta.recv_u))
        y_sent_UD = all_to_all(wire_dtype(y_recv_UD), meta.send_u, meta.recv_u, self.ep_group,
                               self._tag("a2a_combine"))
        if meta.out_dtype is not None:
            y_sent_UD = y_sent_UD.to(meta.out_dtype)
        # 8. Back to this rank's tokens (each token's ranks add up).
        out_TD = y_sent_UD.new_zeros(meta.num_tokens, y_sent_UD.shape[1])
        return out_TD.index_add(0, meta.token_U, y_sent_UD)
