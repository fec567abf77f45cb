"""Apply tensor and expert parallelism to a built model, in one place, in place.

The model is built whole (same seed on every rank) and then sharded, so every rank's
shard is a slice of one reference model: what the equivalence tests rely on.
"""
from __future__ import annotations

from torch import nn


def parallelize(model: nn.Module, groups) -> nn.Module:
    if groups.size("tp") > 1:
        from dmoe.parallel.parallelize_tp import apply_tensor_parallel

        apply_tensor_parallel(model, groups.tp)
    if groups.size("ep") > 1:
        from dmoe.parallel.expert_parallel import shard_moe_layers

        shard_moe_layers(model, groups.ep)
    return model
