"""Optimizer parameter groups shared by both engines (and the single-process references)."""
from __future__ import annotations

import torch

from dmoe.parallel.param_roles import is_expert


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; experts in groups of their own (DeepSpeed needs that)."""
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2 and "tok_emb" not in name and "pos_emb" not in name
        expert = is_expert(p)
        key = (decay, expert)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "name": f"{'expert' if expert else 'dense'}_{'decay' if decay else 'no_decay'}"}
            if expert:
                groups[key].update(moe=True)
        groups[key]["params"].append(p)
    return list(groups.values())
