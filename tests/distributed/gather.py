"""Test-side reassembly of TP-sharded parameters (or their grads) into full tensors, by
the sharding plan (dmoe.parallel.plan), for comparisons with an unsharded reference."""
from __future__ import annotations

import torch
import torch.distributed as dist

from dmoe.parallel.plan import TP, ShardRule, sharding_plan


def all_gather_ragged(x: torch.Tensor, dim: int, group) -> list[torch.Tensor]:
    """Every rank's piece, whose `dim` sizes may differ: pad to the largest, gather, trim."""
    world = dist.get_world_size(group)
    size = torch.tensor([x.shape[dim]])
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    x = x.movedim(dim, 0)
    padded = x.new_zeros((int(max(sizes)),) + x.shape[1:])
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return [p[: int(n)].movedim(0, dim) for p, n in zip(parts, sizes)]


@torch.no_grad()
def gather_full_tensors(model: torch.nn.Module, tp_group, grads: bool = False) -> dict:
    """name -> full (unsharded over TP) parameter, or its grad; names as named_parameters().

    Communication: all-gathers per TP-sharded parameter, so every TP rank must call it.
    Replicated (and EP-sharded) parameters are returned as they are (cloned); missing
    grads as None."""
    plan, world = sharding_plan(model), dist.get_world_size(tp_group)
    out = {}
    for name, param in model.named_parameters():
        local = param.grad if grads else param
        rule = plan.get(name)
        if local is None:
            out[name] = None
        elif rule is None or rule.kind != TP or world == 1:
            out[name] = local.detach().clone()
        else:
            out[name] = unshard(local.detach(), rule, tp_group)
    return out


def unshard(local: torch.Tensor, rule: ShardRule, tp_group) -> torch.Tensor:
    """The full tensor from every TP rank's shard `local` cut by `rule` (all-gathers)."""
    pieces = all_gather_ragged(local, rule.dim, tp_group)
    full = sum(p.shape[rule.dim] for p in pieces)
    shape = list(local.shape)
    shape[rule.dim] = full
    whole = local.new_empty(shape)
    for r, piece in enumerate(pieces):
        whole.index_copy_(rule.dim, rule.index(full, r, len(pieces)), piece)
    return whole
