"""Apply expert parallelism to a built model: shard the experts, swap in the all-to-all.

    shard_moe_layers(model, ep_group)      # every MoE layer
    shard_moe_layer(layer, ep_group)       # one

The model is built whole (same seed on every rank, so every rank holds the same full
weights), then each MoE layer keeps only the rows of its stacked expert weights that the
sharding plan's "ep" rule gives this EP rank: the global experts
`dmoe.parallel.layout.expert_range(ep_rank, ep, E)`, the same ownership the all-to-all
dispatcher routes by. The kept weights are marked as expert parameters through
dmoe.parallel.param_roles. Communication: one all_gather_object over the EP group in
shard_moe_layers (check_same_layers: every rank has the same MoE layers).
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from dmoe.moe.experts import GroupedExperts
from dmoe.moe.layer import MoELayer
from dmoe.parallel import param_roles
from dmoe.parallel.plan import EXPERT_RULE

from .dedup_dispatcher import DedupAllToAllDispatcher
from .dispatcher import AllToAllDispatcher

log = logging.getLogger(__name__)


def _local_experts(experts: GroupedExperts, index: torch.Tensor) -> GroupedExperts:
    with torch.device("meta"):  # no init work, no draw from the RNG
        local = GroupedExperts(len(index), experts.d_model, experts.d_ff, experts.activation,
                               impl=experts.impl, recompute=experts.recompute)
    local.compute_dtype = experts.compute_dtype
    for name in ("w1", "w2"):
        full = getattr(experts, name)
        rows = full.detach().index_select(0, index.to(full.device)).clone()
        setattr(local, name, nn.Parameter(rows, full.requires_grad))
    return local


def shard_moe_layer(layer: MoELayer, ep_group: dist.ProcessGroup | None = None,
                    dedup: bool = False, chunks: int = 1) -> MoELayer:
    """In place: keep this EP rank's experts and route through the all-to-all dispatcher
    (dedup: the one that sends each token once per EP rank, parallel.a2a_dedup; chunks:
    parallel.a2a_chunks, exchanges overlapped with the experts)."""
    if dedup and chunks > 1:
        raise ValueError(f"parallel.a2a_chunks ({chunks}) > 1 needs parallel.a2a_dedup false")
    ep, ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    num_experts = layer.experts.num_experts
    index = EXPERT_RULE.index(num_experts, ep_rank, ep)
    layer.experts = _local_experts(layer.experts, index)
    for param in layer.experts.parameters():
        param_roles.mark_expert(param, ep)
    layer_id = layer.dispatcher.layer_id if hasattr(layer.dispatcher, "layer_id") else None
    if dedup:
        layer.dispatcher = DedupAllToAllDispatcher(num_experts, layer.dispatcher.capacity, ep_group)
    else:
        layer.dispatcher = AllToAllDispatcher(num_experts, layer.dispatcher.capacity, ep_group, chunks)
    if layer_id is not None:
        layer.dispatcher.set_layer_id(layer_id)
    return layer


def check_same_layers(layers: list[MoELayer], ep_group: dist.ProcessGroup | None) -> None:
    """Once, before sharding (one all_gather_object over the EP group): every EP rank has
    the same MoE layers with the same expert count and width. The per-forward header
    check (dispatcher.HEADER) cannot catch a different expert count itself: the counts
    message is sized by it, so peers would wait on messages of different sizes."""
    mine = [(layer.experts.num_experts, layer.experts.d_model) for layer in layers]
    every = [None] * dist.get_world_size(ep_group)
    dist.all_gather_object(every, mine, group=ep_group)
    ranks, me = dist.get_process_group_ranks(ep_group or dist.group.WORLD), dist.get_rank(ep_group)
    for peer, theirs in zip(ranks, every):
        if theirs != mine:
            raise RuntimeError(
                f"expert parallelism, EP group of global ranks {ranks}: rank {peer} has MoE layers "
                f"(num_experts, d_model) {theirs}, rank {ranks[me]} has {mine}")


def shard_moe_layers(model: nn.Module, ep_group: dist.ProcessGroup | None = None,
                     dedup: bool = False, chunks: int = 1) -> int:
    """Shards every MoELayer inside `model`; returns how many were sharded. Each layer's
    dispatcher gets its index as layer id: the count exchange checks the peers agree."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    check_same_layers(layers, ep_group)
    for i, layer in enumerate(layers):
        shard_moe_layer(layer, ep_group, dedup, chunks)
        layer.dispatcher.set_layer_id(i)
    log.info("expert parallel: sharded %d MoE layers over %d ranks", len(layers),
             dist.get_world_size(ep_group))
    return len(layers)
