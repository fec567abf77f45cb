"""The sharding plan: for every parameter of a MoETransformer, how TP or EP splits it.

    plan = sharding_plan(model)          # {"blocks.0.attn.qkv.weight": ShardRule("tp", 0, 3, 16), ...}
    index = plan[name].index(full, shard, shards)   # indices along rule.dim that one shard holds

This is the one description of the split, read by everything that needs it:
    dmoe.parallel.tensor_parallel.apply   swaps in the TP layer each "tp" rule names
    dmoe.parallel.expert_parallel.apply   keeps each EP rank's experts ("ep" rules)
    dmoe.checkpoint                       the slice each rank saves, loads and reshards
The plan is a function of the model's structure only (module types and names), so it
reads the same off an unsharded model, a meta-device one built from a config, or a model
that is already sharded. Parameters it does not name are replicated.

    parameter                     rule
    tok_emb.weight                tp dim 0 (vocabulary rows)
    blocks.i.attn.qkv.weight      tp dim 0, packed q, k, v chunks (sizes under GQA), whole heads
    blocks.i.attn.proj.weight     tp dim 1, whole heads
    blocks.i.ffn.fc1.weight       tp dim 0 (dense MLP; SwiGLU: gate and up chunks split alike)
    blocks.i.ffn.fc2.weight       tp dim 1
    blocks.i.shared_expert.fc1/2  as the dense MLP (shared experts are dense parameters)
    biases                        with their column split, replicated for a row split
    blocks.i.ffn.experts.w1, w2   ep dim 0 (expert rows; ownership: dmoe.parallel.layout)
    lm_head.weight                tp dim 0, unless tied to tok_emb (then saved once as tok_emb)

Shards are balanced in whole `unit`s: with 3 heads on 2 ranks, rank 0 holds 2 heads and
rank 1 one. `chunks` handles packed weights such as qkv ([q; k; v] rows): each chunk is
split the same way, so a rank's q, k and v rows belong to the same heads. No
communication here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from dmoe.parallel.layout import expert_range

TP, EP = "tp", "ep"


def shard_range(size: int, rank: int, world: int, unit: int = 1) -> tuple[int, int]:
    """[start, stop) of rank's balanced share of `size`, in whole units of `unit`."""
    if size % unit:
        raise ValueError(f"size ({size}) must be a multiple of the shard unit ({unit})")
    units = size // unit
    if units < world:
        raise ValueError(f"cannot split {units} unit(s) of {unit} over parallel.tp ({world}) ranks")
    base, extra = divmod(units, world)
    start = rank * base + min(rank, extra)
    return start * unit, (start + base + (rank < extra)) * unit


def chunk_sizes(size: int, chunks: int | tuple[int, ...]) -> tuple[int, ...]:
    """Sizes of the packed blocks along a dim: `chunks` equal ones, or the given sizes."""
    if isinstance(chunks, int):
        if size % chunks:
            raise ValueError(
                f"size ({size}) must be divisible by its number of packed chunks ({chunks})"
            )
        return (size // chunks,) * chunks
    if sum(chunks) != size:
        raise ValueError(f"packed chunks {list(chunks)} do not add up to the size ({size})")
    return tuple(chunks)


def shard_index(size: int, rank: int, world: int, chunks: int | tuple[int, ...] = 1,
                unit: int = 1) -> torch.Tensor:
    """Indices (along the split dim) that rank owns; each packed chunk is split alike
    (`chunks`: a number of equal chunks, or their sizes, e.g. q, k, v under GQA)."""
    pieces, offset = [], 0
    for chunk in chunk_sizes(size, chunks):
        start, stop = shard_range(chunk, rank, world, unit)
        pieces.append(torch.arange(offset + start, offset + stop))
        offset += chunk
    return torch.cat(pieces)


@dataclass(frozen=True)
class ShardRule:
    """How one parameter is split: over TP (balanced, head-aligned) or EP (expert rows)."""

    kind: str  # TP | EP
    dim: int
    chunks: int | tuple[int, ...] = 1  # packed blocks split alike: a count, or their sizes
    unit: int = 1

    def index(self, full: int, shard: int, shards: int) -> torch.Tensor:
        """Indices along `dim` (of global size `full`) held by shard `shard` of `shards`."""
        if self.kind == EP:
            experts = expert_range(shard, shards, full)
            return torch.arange(experts.start, experts.stop)
        return shard_index(full, shard, shards, self.chunks, self.unit)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict | None) -> ShardRule | None:
        if data is None:
            return None
        chunks = data.get("chunks", 1)
        return ShardRule(**{**data, "chunks": tuple(chunks) if isinstance(chunks, list) else chunks})


EXPERT_RULE = ShardRule(EP, 0)  # stacked expert weights [E, ...]: rows of the rank's experts


def _linear_rules(prefix: str, linear: nn.Module, rule: ShardRule) -> dict[str, ShardRule]:
    """A linear's weight rule; a column split also splits the bias, a row split keeps it whole."""
    rules = {f"{prefix}.weight": rule}
    if getattr(linear, "bias", None) is not None and rule.dim == 0:
        rules[f"{prefix}.bias"] = ShardRule(TP, 0, rule.chunks, rule.unit)
    return rules


def sharding_plan(model: nn.Module) -> dict[str, ShardRule]:
    """name -> ShardRule for every parameter TP or EP splits (names as named_parameters())."""
    from dmoe.model.transformer import MLP, Attention
    from dmoe.moe.experts import GroupedExperts

    rules = {"tok_emb.weight": ShardRule(TP, 0)}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            qkv = ShardRule(TP, 0, module.qkv_chunks(), module.head_dim)
            rules |= _linear_rules(f"{name}.qkv", module.qkv, qkv)
            rules |= _linear_rules(f"{name}.proj", module.proj, ShardRule(TP, 1, 1, module.head_dim))
        elif isinstance(module, MLP):
            rules |= _linear_rules(f"{name}.fc1", module.fc1, ShardRule(TP, 0, module.fc1_chunks()))
            rules |= _linear_rules(f"{name}.fc2", module.fc2, ShardRule(TP, 1))
        elif isinstance(module, GroupedExperts):
            rules[f"{name}.w1"] = rules[f"{name}.w2"] = EXPERT_RULE
    if model.lm_head.weight is not model.tok_emb.weight:
        rules |= _linear_rules("lm_head", model.lm_head, ShardRule(TP, 0))
    return rules
