"""Apply tensor and expert parallelism to a built model, in one place, in place.

The model is built whole (same seed on every rank) and then sharded as the sharding plan
(dmoe.parallel.plan) says, so every rank's shard is a slice of one reference model: what
the equivalence tests and the checkpoints rely on. Communication: under EP one
all_gather_object that checks every EP rank has the same MoE layers (expert_parallel/apply.py).
"""
from __future__ import annotations

from torch import nn

from dmoe.parallel.layout import ProcessGroups


def parallelize(model: nn.Module, groups: ProcessGroups) -> nn.Module:
    if groups.size("tp") > 1:
        from dmoe.parallel.tensor_parallel.apply import apply_tensor_parallel

        apply_tensor_parallel(model, groups.tp)
    if groups.size("ep") > 1:
        from dmoe.parallel.expert_parallel.apply import shard_moe_layers

        shard_moe_layers(model, groups.ep, dedup=model.cfg.parallel.a2a_dedup,
                         chunks=model.cfg.parallel.a2a_chunks)
    return model
