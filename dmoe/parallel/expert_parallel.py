"""Apply expert parallelism to a built model: shard the experts, swap in the all-to-all.

The model is built whole (same seed on every rank, so every rank holds the same full
weights), then each MoE layer keeps only its EP rank's slice of the stacked expert
weights. Rank r of the EP group keeps global experts [r*L, (r+1)*L), L = E / ep, matching
`AllToAllDispatcher`'s ownership rule. No communication happens here.

Expert parameters are tagged so later code can find them:
    param.dmoe_expert = True          dmoe's own grad reduction (expert-DP group)
    param.allreduce = False           DeepSpeed: an MoE param (deepspeed.moe.utils.is_moe_param)
    param.group_name = "ep_size_{ep}" DeepSpeed: names the expert group (as deepspeed.moe.layer.MoE)
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from dmoe.moe.experts import GroupedExperts
from dmoe.moe.layer import MoELayer

from .ep_dispatch import AllToAllDispatcher

log = logging.getLogger(__name__)


def tag_expert_params(module: nn.Module, ep: int) -> None:
    for param in module.parameters():
        param.dmoe_expert = True
        param.allreduce = False
        param.group_name = f"ep_size_{ep}"


def is_expert_param(param: torch.Tensor) -> bool:
    return getattr(param, "dmoe_expert", False)


def _expert_slice(experts: GroupedExperts, first: int, count: int) -> GroupedExperts:
    with torch.device("meta"):  # no init work, no draw from the RNG
        shard = GroupedExperts(count, experts.d_model, experts.d_ff, experts.activation)
    shard.compute_dtype = experts.compute_dtype
    rows = slice(first, first + count)
    for name in ("w1", "w2"):
        full = getattr(experts, name)
        setattr(shard, name, nn.Parameter(full.detach()[rows].clone(), full.requires_grad))
    shard.first_expert = first  # global id of local expert 0 (for checkpoints, logs)
    return shard


def shard_moe_layer(layer: MoELayer, ep_group=None) -> MoELayer:
    """In place: keep this EP rank's experts and route through the all-to-all dispatcher."""
    ep, ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    num_experts = layer.experts.num_experts
    if num_experts % ep:
        raise ValueError(f"moe.num_experts ({num_experts}) must be divisible by parallel.ep ({ep})")
    num_local = num_experts // ep
    layer.experts = _expert_slice(layer.experts, ep_rank * num_local, num_local)
    tag_expert_params(layer.experts, ep)
    layer.dispatcher = AllToAllDispatcher(num_experts, layer.dispatcher.capacity, ep_group)
    return layer


def shard_moe_layers(model: nn.Module, ep_group=None) -> int:
    """Shards every MoELayer inside `model`; returns how many were sharded."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        shard_moe_layer(layer, ep_group)
    log.info("expert parallel: sharded %d MoE layers over %d ranks", len(layers),
             dist.get_world_size(ep_group))
    return len(layers)
