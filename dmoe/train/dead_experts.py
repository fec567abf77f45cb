"""Dead experts: an expert that received no tokens for `train.dead_expert_steps` steps in a row.

    tracker = DeadExpertTracker(steps=100, layer_names=["moe0 (blocks.1.ffn)", ...])
    for step ...:
        newly_dead = tracker.update(step, routed_LE)   # {layer: [expert ids]} that just died
        tracker.dead_per_layer()                       # [L] experts dead now, per layer

Pure bookkeeping on the per-step routed counts [L, E] (tokens routed to each expert before
capacity drops, summed over the micro-batches and the DP ranks, so every rank holds the
same counts and reaches the same verdict). An expert is reported once when its run of
zero-count steps reaches `steps`; it is reported again only after it revived (received a
token) and died once more. Shape legend: L MoE layers, E experts.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class DeadExpertTracker:
    def __init__(self, steps: int, layer_names: list[str] | None = None):
        self.steps = steps  # 0: off
        self.layer_names = layer_names
        self.zero_run_LE: torch.Tensor | None = None  # consecutive steps with no tokens
        self.reported_LE: torch.Tensor | None = None

    def update(self, step: int, routed_LE: torch.Tensor) -> dict[int, list[int]]:
        """Counts one step; returns {layer: expert ids} that reached `steps` at this step."""
        if self.steps <= 0:
            return {}
        empty_LE = routed_LE.detach().cpu() == 0
        if self.zero_run_LE is None:
            self.zero_run_LE = torch.zeros(empty_LE.shape, dtype=torch.int64)
            self.reported_LE = torch.zeros(empty_LE.shape, dtype=torch.bool)
        self.zero_run_LE = torch.where(empty_LE, self.zero_run_LE + 1, torch.zeros_like(self.zero_run_LE))
        self.reported_LE &= empty_LE  # a revived expert may be reported again later
        new_LE = (self.zero_run_LE >= self.steps) & ~self.reported_LE
        self.reported_LE |= new_LE
        return {int(layer): new_LE[layer].nonzero().flatten().tolist()
                for layer in new_LE.any(-1).nonzero().flatten().tolist()}

    def dead_per_layer(self) -> list[int]:
        """How many experts of each layer have had no tokens for `steps` steps in a row."""
        if self.zero_run_LE is None or self.steps <= 0:
            return []
        return (self.zero_run_LE >= self.steps).sum(-1).tolist()

    def warn(self, step: int, newly_dead: dict[int, list[int]]) -> None:
        """One warning line per layer with experts that just died."""
        for layer, experts in newly_dead.items():
            name = self.layer_names[layer] if self.layer_names else f"moe{layer}"
            log.warning("step %d: %s: expert%s %s received no tokens for %d consecutive steps "
                        "(train.dead_expert_steps)", step, name, "s" if len(experts) > 1 else "",
                        ", ".join(map(str, experts)), self.steps)
