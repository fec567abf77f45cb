"""Which slice of which global tensor a rank holds, and which rank writes it.

Pure maths shared by the checkpoint writer, the loader (resharding on load) and the
offline tools (`dmoe checkpoint reshard|export`); no communication here.

A parameter is either replicated (rule None), TP-sharded along one dim (rule kind "tp":
the balanced, head-aligned split of dmoe.parallel.tensor_parallel, `chunks` packed blocks
each split alike) or EP-sharded (rule kind "ep": contiguous expert rows, dim 0). A slice
is written as runs: [[start, stop), ...] along the rule's dim, e.g. qkv under tp=2 with
4 heads of 4: [[0, 8], [16, 24], [32, 40]].

Writers: of all ranks holding the same slice, the one at coordinate 0 of every axis the
tensor is replicated over, so each slice is written exactly once:
    replicated  rank 0        tp rule  ranks with e = d = 0      ep rule  ranks with t = d = 0
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from dmoe.parallel.layout import ParallelLayout
from dmoe.parallel.tensor_parallel import _Sharded, shard_index


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; str(err) is one line naming the file and the fault."""


@dataclass(frozen=True)
class ShardRule:
    kind: str  # "tp" | "ep"
    dim: int
    chunks: int = 1
    unit: int = 1

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict | None) -> "ShardRule | None":
        return None if data is None else ShardRule(**data)


@dataclass
class ParamSpec:
    """One distinct parameter of a live (possibly sharded) model."""

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


def rule_runs(rule: ShardRule | None, full: int, layout: ParallelLayout, rank: int):
    """The runs a rank of `layout` holds along rule.dim (full = global size of that dim)."""
    if rule is None:
        return None
    t, e, _ = layout.coords(rank)
    if rule.kind == "tp":
        return runs_of(shard_index(full, t, layout.tp, rule.chunks, rule.unit))
    if full % layout.ep:
        raise CheckpointError(f"{full} experts cannot be split over parallel.ep ({layout.ep})")
    per = full // layout.ep
    return [[e * per, (e + 1) * per]]


def is_writer(rule: ShardRule | None, layout: ParallelLayout, rank: int) -> bool:
    t, e, d = layout.coords(rank)
    if rule is None:
        return rank == 0
    if rule.kind == "tp":
        return e == 0 and d == 0
    return t == 0 and d == 0


def cut(full: torch.Tensor, rule: ShardRule | None, runs) -> torch.Tensor:
    """This slice of a global tensor."""
    if rule is None:
        return full
    return full.index_select(rule.dim, index_of(runs)).contiguous()


def param_specs(model: nn.Module, groups) -> list[ParamSpec]:
    """Every distinct parameter (tied weights once, under their first name) with its slice."""
    specs, seen = [], set()
    for mname, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{mname}.{pname}" if mname else pname
            specs.append(_spec(name, pname, module, param, groups))
    return specs


def _spec(name: str, pname: str, module: nn.Module, param, groups) -> ParamSpec:
    shape = list(param.shape)
    if isinstance(module, _Sharded) and pname in module.full_sizes:
        dim, full = module.full_sizes[pname]
        rule = ShardRule("tp", dim, getattr(module, "chunks", 1), getattr(module, "unit", 1))
        shape[dim] = full
        runs = runs_of(module._index(pname, groups.index("tp")))
        return ParamSpec(name, param, shape, rule, runs)
    if getattr(param, "dmoe_expert", False) and groups.size("ep") > 1:
        first, local = module.first_expert, shape[0]
        shape[0] = local * groups.size("ep")
        return ParamSpec(name, param, shape, ShardRule("ep", 0), [[first, first + local]])
    return ParamSpec(name, param, shape, None, None)
