"""Rank layout: parallel degrees -> the global ranks of every process group.

Four kinds of group, for `world_size = tp * dp` and `ep` carved out of the dp ranks:
    tp   tensor parallel: ranks splitting one layer's matmuls (size tp)
    dp   data parallel: ranks holding the same dense weights; dense grads reduce here (size dp)
    ep   expert parallel: ranks exchanging tokens by all-to-all, each holding 1/ep of the
         experts (size ep)
    edp  expert-data parallel: every rank holding the same expert shard; expert grads
         reduce here (size tp*dp/ep). Experts are not TP-sharded: each TP rank routes its
         own slice of the tokens, so TP ranks hold the same experts with different
         gradient contributions, and they belong to the same edp group.

Rank order (Megatron's tp-ep-dp idea): TP varies fastest, so a TP group stays inside a
node; then EP; then the rest of DP. With t in [0, tp), e in [0, ep), d in [0, dp/ep):
    rank = t + tp * (e + ep * d)

Example, world 8, tp 2, ep 2 (dp 4, edp 4):
    rank   0 1 2 3 4 5 6 7
    t      0 1 0 1 0 1 0 1
    e      0 0 1 1 0 0 1 1
    d      0 0 0 0 1 1 1 1
    tp   [0,1] [2,3] [4,5] [6,7]
    dp   [0,2,4,6] [1,3,5,7]
    ep   [0,2] [1,3] [4,6] [5,7]
    edp  [0,1,4,5] [2,3,6,7]
Rank 2 holds expert shard e=1, swaps tokens with rank 0, and reduces its expert grads
with ranks 3, 6 and 7.

Expert ownership lives here too: EP rank e holds the contiguous global experts
`expert_range(e, ep, num_experts)` = [e*L, (e+1)*L), L = num_experts / ep. The model
sharding, the all-to-all dispatcher, checkpoints and the profiling tools all ask this
module, and the divisibility check is made here (and, for early one-line errors, in
dmoe.config.validate).

Everything here is pure except `build_process_groups`, which calls
`torch.distributed.new_group` for every group, in the same order on every rank (torch
requires all ranks to take part in each new_group call), and keeps only this rank's.
No module-level state holds groups: the caller owns the returned `ProcessGroups`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

GROUP_KINDS = ("tp", "dp", "ep", "edp")


def expert_range(ep_rank: int, ep: int, num_experts: int) -> range:
    """Global ids of the experts EP rank `ep_rank` of `ep` holds (contiguous blocks)."""
    if num_experts % ep:
        raise ValueError(f"moe.num_experts ({num_experts}) must be divisible by parallel.ep ({ep})")
    per_rank = num_experts // ep
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def expert_owner(num_experts: int, ep: int) -> torch.Tensor:
    """[E] the EP rank holding each global expert."""
    per_rank = len(expert_range(0, ep, num_experts))
    return torch.arange(num_experts) // per_rank


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of parallelism; dp defaults to world_size // tp and is checked when given."""

    world_size: int
    tp: int = 1
    ep: int = 1
    dp: int | None = None

    def __post_init__(self):
        for name in ("world_size", "tp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                label = name if name == "world_size" else f"parallel.{name}"
                raise ValueError(f"{label} ({value!r}) must be a positive integer")
        if self.dp is None:
            if self.world_size % self.tp:
                raise ValueError(
                    f"world size {self.world_size} is not dp*tp "
                    f"(parallel.tp ({self.tp}) does not divide it)"
                )
            object.__setattr__(self, "dp", self.world_size // self.tp)
        elif self.dp * self.tp != self.world_size:
            raise ValueError(
                f"world size {self.world_size} is not dp*tp "
                f"(parallel.dp ({self.dp}) * parallel.tp ({self.tp}) = {self.dp * self.tp})"
            )
        if self.dp % self.ep:
            raise ValueError(
                f"parallel.ep ({self.ep}) must divide the data-parallel size ({self.dp})"
            )

    @property
    def edp(self) -> int:
        """Size of an expert-data-parallel group: every rank holding the same expert shard."""
        return self.tp * self.dp // self.ep

    def validate(self, num_experts: int) -> None:
        """Checks that the experts split evenly over the EP ranks."""
        expert_range(0, self.ep, num_experts)

    def local_experts(self, rank: int, num_experts: int) -> range:
        """Global ids of the experts a global rank holds."""
        return expert_range(self.coords(rank)[1], self.ep, num_experts)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(t, e, d) of a global rank: its TP index, EP index and outer DP index."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world size ({self.world_size}))")
        return rank % self.tp, (rank // self.tp) % self.ep, rank // (self.tp * self.ep)

    def shard_coords(self, kind: str, rank: int) -> tuple[int, int]:
        """(index, count) of the shard a rank holds of a tensor split over `kind` (tp | ep)."""
        t, e, _ = self.coords(rank)
        return (t, self.tp) if kind == "tp" else (e, self.ep)

    def rank_of(self, t: int, e: int, d: int) -> int:
        return t + self.tp * (e + self.ep * d)

    def groups(self, kind: str) -> list[list[int]]:
        """All groups of one kind, each a sorted list of global ranks, in a fixed order."""
        if kind not in GROUP_KINDS:
            raise ValueError(f"group kind ({kind!r}) must be one of {GROUP_KINDS}")
        t_all, e_all, d_all = range(self.tp), range(self.ep), range(self.dp // self.ep)
        if kind == "tp":
            return [[self.rank_of(t, e, d) for t in t_all] for d in d_all for e in e_all]
        if kind == "dp":
            return [[self.rank_of(t, e, d) for d in d_all for e in e_all] for t in t_all]
        if kind == "ep":
            return [[self.rank_of(t, e, d) for e in e_all] for d in d_all for t in t_all]
        return [sorted(self.rank_of(t, e, d) for d in d_all for t in t_all) for e in e_all]

    def rank_groups(self, rank: int) -> dict[str, list[int]]:
        """For one global rank: the global ranks of its group of every kind."""
        self.coords(rank)  # range check
        return {kind: _containing(self.groups(kind), rank) for kind in GROUP_KINDS}

    def describe(self) -> str:
        """Readable text of every group, e.g. for the run log or `dmoe layout`."""
        lines = [
            f"world {self.world_size} = tp {self.tp} x dp {self.dp}; experts in ep {self.ep} "
            f"shards, each held by edp {self.edp} ranks (rank = t + tp*(e + ep*d))"
        ]
        for kind in GROUP_KINDS:
            groups = self.groups(kind)
            listed = " ".join(str(g).replace(", ", ",") for g in groups)
            lines.append(f"{kind:<4} {len(groups)} x {len(groups[0])}: {listed}")
        return "\n".join(lines)


def _containing(groups: list[list[int]], rank: int) -> list[int]:
    return next(g for g in groups if rank in g)


@dataclass
class ProcessGroups:
    """This rank's process groups, built by `build_process_groups`; passed explicitly."""

    layout: ParallelLayout
    rank: int
    tp: dist.ProcessGroup
    dp: dist.ProcessGroup
    ep: dist.ProcessGroup
    edp: dist.ProcessGroup
    ranks: dict[str, list[int]] = field(default_factory=dict)  # kind -> global ranks

    def size(self, kind: str) -> int:
        return len(self.ranks[kind])

    def index(self, kind: str) -> int:
        """This rank's position inside its group of `kind` (e.g. its EP shard index)."""
        return self.ranks[kind].index(self.rank)


def build_process_groups(layout: ParallelLayout, rank: int | None = None) -> ProcessGroups:
    """Collective: every rank must call this, with the same layout, in the same order.

    Creates every group of every kind (torch needs all ranks in each new_group call) and
    returns the ones containing `rank` (default: this process's global rank).
    """
    if not dist.is_initialized():
        raise RuntimeError("build_process_groups needs torch.distributed to be initialized")
    if dist.get_world_size() != layout.world_size:
        raise ValueError(
            f"world size {dist.get_world_size()} differs from the layout's ({layout.world_size})"
        )
    rank = dist.get_rank() if rank is None else rank
    mine, ranks = {}, {}
    for kind in GROUP_KINDS:
        for group_ranks in layout.groups(kind):
            group = dist.new_group(group_ranks)
            if rank in group_ranks:
                mine[kind], ranks[kind] = group, group_ranks
    return ProcessGroups(layout=layout, rank=rank, ranks=ranks, **mine)
