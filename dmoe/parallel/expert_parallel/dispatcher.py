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

The counts message carries a header (`HEADER`: layer id, row width, row dtype, local
experts) after each peer's counts; every rank checks its peers' against its own before
any row moves, so ranks that disagree (a different model, layer order or autocast) fail
with one line at the count exchange instead of exchanging garbage or hanging. (Peers with
a different local expert count would send counts messages of different sizes: that is
checked once, when the layers are sharded: apply.check_same_layers.)

Overlap (parallel.a2a_chunks = c > 1, `dispatch_combine`): every (sender, receiver) block
of rows is cut into c pieces (chunk_plan.py); the c dispatch all-to-alls are issued at
once (async), then per chunk: wait, run the experts, issue its return all-to-all, so a
chunk's expert compute overlaps the exchanges of the others; in backward the split-phase
all-to-alls (all_to_all.start_all_to_all) overlap the same way in reverse.

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

from .all_to_all import all_to_all, start_all_to_all, wait_all_to_all
from .chunk_plan import plan_chunks


@dataclass(frozen=True)
class AllToAllMeta(DispatchMeta):
    send_splits: list[int]  # rows this rank sends to each EP rank
    recv_splits: list[int]  # rows this rank receives from each EP rank
    recv_counts_SL: torch.Tensor  # rows received from source s for local expert l
    sort_N: torch.Tensor  # received (source, expert) order -> local-expert-contiguous order
    unsort_N: torch.Tensor  # inverse of sort_N
    out_dtype: torch.dtype | None = None  # the tokens' dtype: combine returns rows in it


def wire_dtype_of(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


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


HEADER = ("layer id", "row width", "row dtype", "local experts")  # after the counts, per peer
_DTYPE_CODES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float8_e4m3fn,
                torch.float8_e5m2)


def _dtype_name(code: int) -> str:
    return str(_DTYPE_CODES[code - 1]).removeprefix("torch.") if 0 < code <= len(_DTYPE_CODES) else "other"


class ExpertParallelDispatcher:
    """What both EP dispatchers share: the group, expert ownership, the layer's comm tags,
    the checked count exchange."""

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

    def _header(self, x_TD: torch.Tensor) -> list[int]:
        dtype = wire_dtype_of(x_TD)
        code = _DTYPE_CODES.index(dtype) + 1 if dtype in _DTYPE_CODES else 0
        return [-1 if self.layer_id is None else self.layer_id, x_TD.shape[1], code, self.num_local]

    def exchange_counts(self, send_SX: torch.Tensor, x_TD: torch.Tensor
                        ) -> tuple[torch.Tensor, list[list[int]], list[list[int]]]:
        """All-to-all of send_SX [S, X] int64 (row j goes to rank j) plus the header; checks
        the peers' headers. Returns recv_SX on the device, and send_SX and recv_SX as host
        lists: the dispatcher's one host sync."""
        S, X = send_SX.shape
        mine = self._header(x_TD)
        msg_SY = torch.cat([send_SX, send_SX.new_tensor(mine).expand(S, len(mine))], 1)
        recv_SY = torch.empty_like(msg_SY)
        comm_trace.all_to_all_single(recv_SY, msg_SY.contiguous(), group=self.ep_group,
                                     tag=self._tag("a2a_counts"))
        flat = torch.cat([send_SX.reshape(-1), recv_SY.reshape(-1)]).tolist()  # the one host sync
        Y = X + len(mine)
        send_rows = [flat[j * X:(j + 1) * X] for j in range(S)]
        recv = [flat[S * X + s * Y:S * X + (s + 1) * Y] for s in range(S)]
        self._check_peers(mine, [row[X:] for row in recv])
        return recv_SY[:, :X], send_rows, [row[:X] for row in recv]

    def _check_peers(self, mine: list[int], theirs_S: list[list[int]]) -> None:
        for s, theirs in enumerate(theirs_S):
            for i, (name, a, b) in enumerate(zip(HEADER, mine, theirs)):
                if a == b:
                    continue
                fmt = _dtype_name if i == 2 else str
                group = self.ep_group or dist.group.WORLD
                ranks, me = dist.get_process_group_ranks(group), dist.get_rank(group)
                layer = "?" if mine[0] < 0 else mine[0]
                raise RuntimeError(
                    f"expert-parallel count exchange, MoE layer {layer}, EP group of global "
                    f"ranks {ranks}: rank {ranks[s]} has {name} {fmt(b)}, rank {ranks[me]} "
                    f"has {fmt(a)}")


class AllToAllDispatcher(ExpertParallelDispatcher):
    """Sends each kept row to the EP rank that owns its expert, and brings it back.
    chunks > 1: `dispatch_combine` pipelines the exchanges with the experts (module doc)."""

    def __init__(self, num_experts: int, capacity: CapacitySettings,
                 ep_group: dist.ProcessGroup | None = None, chunks: int = 1):
        super().__init__(num_experts, capacity, ep_group)
        if chunks < 1:
            raise ValueError(f"parallel.a2a_chunks ({chunks}) must be >= 1")
        self.chunks = chunks

    @property
    def overlaps_experts(self) -> bool:
        """MoELayer then calls dispatch_combine instead of dispatch, experts, combine."""
        return self.chunks > 1

    def _route(self, x_TD: torch.Tensor, routing: Routing, training: bool):
        # 1. Local capacity plan on this rank's tokens: kept rows in global-expert order.
        plan, token_idx_N, gate_N, cap = permute_tokens(
            routing, x_TD.shape[0], self.num_experts, self.capacity, training, compact=False
        )
        # 2. Exchange per-expert counts: send_SL[j, l] rows go to rank j's local expert l;
        #    recv_SL[s, l] rows arrive from rank s for my local expert l.
        recv_SL, send_rows, recv_rows = self.exchange_counts(
            plan.counts_E.reshape(self.ep, self.num_local), x_TD)
        kept = sum(map(sum, send_rows))  # kept rows come first in the uncompacted order
        return plan, token_idx_N[:kept], gate_N[:kept], cap, recv_SL, send_rows, recv_rows

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, training: bool
                 ) -> tuple[torch.Tensor, AllToAllMeta]:
        plan, token_idx_N, gate_N, cap, recv_SL, send_rows, recv_rows = self._route(
            x_TD, routing, training)
        send_splits, recv_splits = [sum(r) for r in send_rows], [sum(r) for r in recv_rows]
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
            counts=[sum(col) for col in zip(*recv_rows)],
            routed_E=plan.routed_E,
            kept_E=plan.counts_E,
            capacity=cap,
            num_tokens=x_TD.shape[0],
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

    def dispatch_combine(self, x_TD: torch.Tensor, routing: Routing, training: bool, experts
                         ) -> tuple[torch.Tensor, DispatchMeta]:
        """dispatch, experts(x_ND, counts), combine in `self.chunks` overlapped chunks."""
        plan, token_idx_N, gate_N, cap, _, send_rows, recv_rows = self._route(x_TD, routing, training)
        chunks, dev, group = plan_chunks(send_rows, recv_rows, self.chunks), x_TD.device, self.ep_group
        # 3. The sent rows in chunk order (piece i of every destination's block).
        order_N = torch.cat([torch.arange(a, b, device=dev) for c in chunks for a, b in c.send_ranges])
        token_idx_N, gate_N = token_idx_N.index_select(0, order_N), gate_N.index_select(0, order_N)
        # 4. Issue every chunk's dispatch exchange at once.
        tag_d, tag_c, flights, first = self._tag("a2a_dispatch"), self._tag("a2a_combine"), [], 0
        for c in chunks:
            rows = token_idx_N[first:first + sum(c.send_splits)]
            first += sum(c.send_splits)
            flights.append(start_all_to_all(wire_dtype(x_TD.index_select(0, rows)),
                                            c.recv_splits, c.send_splits, group, tag_d))
        # 5. Per chunk: its rows (the later chunks still in flight), regrouped by local
        #    expert, the experts, back to (source, expert) order, its return issued.
        back = []
        for c, (buf, flight) in zip(chunks, flights):
            x_recv_ND = wait_all_to_all(buf, flight, c.recv_splits, c.send_splits, group, tag_d)
            n = sum(c.recv_splits)
            sort_N = local_expert_order(torch.tensor(c.recv_counts_SL, device=dev), n)
            y_ND = experts(x_recv_ND.index_select(0, sort_N), [sum(col) for col in zip(*c.recv_counts_SL)])
            unsort_N = torch.empty_like(sort_N).scatter_(0, sort_N, torch.arange(n, device=dev))
            back.append(start_all_to_all(wire_dtype(y_ND.index_select(0, unsort_N)),
                                         c.send_splits, c.recv_splits, group, tag_c))
        # 6. The returned rows (in chunk order, as token_idx_N), gate-weighted per token.
        y_sent_ND = torch.cat([wait_all_to_all(buf, flight, c.send_splits, c.recv_splits, group, tag_c)
                               for c, (buf, flight) in zip(chunks, back)]).to(x_TD.dtype)
        meta = DispatchMeta(token_idx_N=token_idx_N, gate_N=gate_N,
                            counts=[sum(col) for col in zip(*recv_rows)], routed_E=plan.routed_E,
                            kept_E=plan.counts_E, capacity=cap, num_tokens=x_TD.shape[0])
        return combine_rows(y_sent_ND, token_idx_N, gate_N, x_TD.shape[0]), meta
