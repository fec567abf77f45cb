"""Which slice of which global tensor a rank holds, and which rank writes it.

Pure maths shared by the checkpoint writer, the loader (resharding on load) and the
offline reshard/export; no communication here. The split itself is the sharding plan's
(dmoe.parallel.plan), read off a meta-device model built from the run's config, so a
live model, a checkpoint and an offline reshard always agree.

A parameter is either replicated (rule None), TP-sharded along one dim (rule kind "tp")
or EP-sharded (rule kind "ep": expert rows, dim 0). A rule whose degree is 1 in a layout
is recorded as None (replicated there). A slice is written as runs: [[start, stop), ...]
along the rule's dim, e.g. qkv under tp=2 with 4 heads of 4: [[0, 8], [16, 24], [32, 40]].

Writers: of all ranks holding the same slice, the one at coordinate 0 of every axis the
tensor is replicated over, so each slice is written exactly once:
    replicated  rank 0        tp rule  ranks with e = d = 0      ep rule  ranks with t = d = 0
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dmoe.config import Config
from dmoe.parallel.layout import ParallelLayout
from dmoe.parallel.plan import TP, ShardRule, sharding_plan


@dataclass
class ParamSlice:
    """One distinct parameter of a live (possibly sharded) model and the slice it holds."""

    name: str
    param: nn.Parameter
    global_shape: list[int]
    rule: ShardRule | None
    runs: list[list[int]] | None  # this rank's slice along rule.dim; None if replicated


def runs_of(index: torch.Tensor) -> list[list[int]]:
    """[0,1,2,5,6] -> [[0, 3], [5, 7]]."""
    runs: list[list[int]] = []
    for i in index.tolist():
        if runs and runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, i + 1])
    return runs


def index_of(runs: list[list[int]]) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in runs]) if runs else torch.zeros(0, dtype=torch.long)


def effective_rule(rule: ShardRule | None, layout: ParallelLayout) -> ShardRule | None:
    """The plan's rule, or None where the layout does not split along its kind."""
    if rule is None or (layout.tp if rule.kind == TP else layout.ep) == 1:
        return None
    return rule


def rule_runs(rule: ShardRule | None, full: int, layout: ParallelLayout, rank: int
              ) -> list[list[int]] | None:
    """The runs a rank of `layout` holds along rule.dim (full = global size of that dim)."""
    if rule is None:
        return None
    return runs_of(rule.index(full, *layout.shard_coords(rule.kind, rank)))


def is_writer(rule: ShardRule | None, layout: ParallelLayout, rank: int) -> bool:
    t, e, d = layout.coords(rank)
    if rule is None:
        return rank == 0
    if rule.kind == TP:
        return e == 0 and d == 0
    return t == 0 and d == 0


def cut(full: torch.Tensor, rule: ShardRule | None, runs: list[list[int]] | None) -> torch.Tensor:
    """This slice of a global tensor."""
    if rule is None:
        return full
    return full.index_select(rule.dim, index_of(runs)).contiguous()


def global_plan(cfg: Config) -> dict[str, tuple[list[int], ShardRule | None]]:
    """name -> (global shape, plan rule) of every distinct parameter of the unsharded model."""
    from dmoe.model.transformer import MoETransformer

    with torch.device("meta"):
        model = MoETransformer(cfg)
    rules = sharding_plan(model)
    return {name: (list(p.shape), rules.get(name)) for name, p in model.named_parameters()}


def param_slices(model: nn.Module, layout: ParallelLayout, rank: int) -> list[ParamSlice]:
    """Every distinct parameter of a live model (tied weights once) with this rank's slice."""
    plan = global_plan(model.cfg)
    slices = []
    for name, param in model.named_parameters():
        shape, rule = plan[name]
        rule = effective_rule(rule, layout)
        runs = rule_runs(rule, shape[rule.dim], layout, rank) if rule else None
        local = list(shape)
        if rule:
            local[rule.dim] = sum(b - a for a, b in runs)
        if list(param.shape) != local:
            raise RuntimeError(f"{name}: holds {list(param.shape)}, the sharding plan says {local} "
                               f"for rank {rank} of {layout}")
        slices.append(ParamSlice(name, param, shape, rule, runs))
    return slices
