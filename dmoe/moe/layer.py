"""The MoE FFN: route, dispatch, run experts, combine; reports its own routing stats.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, N kept rows.
Communication happens only inside the dispatcher (none for LocalDispatcher).

Profiling: `enable_profiling(i)` names the layer's communication events (through the
dispatcher) and wraps its four phases in torch.profiler ranges moe{i}/route, dispatch,
experts, combine (moe{i}/route and moe{i}/dispatch_experts_combine where the dispatcher
runs the last three as one: the local one, fused, and EP with overlapped chunks); off by
default, so a plain forward pays nothing for it. Likewise
`routing_observer` (None by default) sees every forward's choices, for routing analysis.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .dispatcher import CapacitySettings, Dispatcher, LocalDispatcher
from .experts import GroupedExperts
from .router import TopKRouter


@dataclass(frozen=True)
class MoEStats:
    """Per-layer, per-forward routing figures (detached, on the activation device)."""

    routed_E: torch.Tensor  # assignments routed to each expert (before drops)
    kept_E: torch.Tensor  # assignments each expert kept
    aux_loss: torch.Tensor  # differentiable
    z_loss: torch.Tensor  # differentiable
    seq_aux_loss: torch.Tensor  # differentiable; per-sequence balance, see TopKRouter.forward
    capacity: int | None

    @property
    def dropped(self) -> torch.Tensor:
        return self.routed_E.sum() - self.kept_E.sum()

    @property
    def drop_fraction(self) -> torch.Tensor:
        return self.dropped.float() / self.routed_E.sum().clamp(min=1)


class MoELayer(nn.Module):
    """A drop-in MoE FFN for any model: y, stats = layer(x) with x [B, S, D] or [T, D].

        layer = MoELayer(d_model=64, num_experts=8, top_k=2, d_ff=128)   # capacity defaults
        loss = task_loss + 0.01 * stats.aux_loss + 0.001 * stats.z_loss

    capacity: CapacitySettings (factor 1.25 in training, 2.0 in eval; None factors: dropless).
    Made expert-parallel over a process group by dmoe.parallel.expert_parallel.apply
    (shard_moe_layers(model, ep_group)): only the dispatcher and the expert shard change.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, d_ff: int,
                 capacity: CapacitySettings | None = None, activation: str = "gelu",
                 jitter_eps: float = 0.0,
                 normalize_topk: bool = True, expert_dtype: str = "float32",
                 score_func: str = "softmax", route_scale: float = 1.0, num_groups: int = 1,
                 topk_groups: int = 1, bias_update_rate: float = 0.0,
                 recompute_experts: bool = False, experts_impl: str = "auto"):
        super().__init__()
        self.router = TopKRouter(d_model, num_experts, top_k, jitter_eps, normalize_topk,
                                 score_func, route_scale, num_groups, topk_groups, bias_update_rate)
        self.experts = GroupedExperts(num_experts, d_model, d_ff, activation, expert_dtype,
                                      impl=experts_impl, recompute=recompute_experts)
        # Swapped for an expert-parallel dispatcher (and a shard of the experts) by
        # dmoe.parallel.parallelize; the model code never sees a process group.
        self.dispatcher: Dispatcher = LocalDispatcher(num_experts, capacity or CapacitySettings())
        self.trace_name: str | None = None  # "moe{i}" while profiling
        # routing analysis (dmoe.analysis): called with each forward's expert_idx_TK
        # (detached; this rank's tokens, in input order); None: off, nothing is paid
        self.routing_observer = None

    def enable_profiling(self, layer_id: int) -> None:
        self.trace_name = f"moe{layer_id}"
        self.dispatcher.set_layer_id(layer_id)

    def _phase(self, name: str):
        if self.trace_name is None:
            return nullcontext()
        return torch.profiler.record_function(f"{self.trace_name}/{name}")

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        """x [B, S, D], or [T, D] (a TP token slice not made of whole sequences): then the
        sequence-wise balance loss treats all T tokens as one sequence."""
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        seq_len = x_BSD.shape[-2] if x_BSD.dim() == 3 else None
        with self._phase("route"):
            routing = self.router(x_TD, seq_len)
        if self.routing_observer is not None:
            self.routing_observer(routing.expert_idx_TK.detach())
        if (getattr(self.dispatcher, "overlaps_experts", False)
                or getattr(self.dispatcher, "fuses_experts", False)):
            # an EP dispatcher that pipelines its all-to-alls with the experts, in chunks;
            # or the local one, whose experts gather and combine their own rows
            with self._phase("dispatch_experts_combine"):
                y_TD, meta = self.dispatcher.dispatch_combine(x_TD, routing, self.training,
                                                              self.experts)
        else:
            with self._phase("dispatch"):
                x_ND, meta = self.dispatcher.dispatch(x_TD, routing, self.training)
            with self._phase("experts"):
                y_ND = self.experts(x_ND, meta.counts)
            with self._phase("combine"):
                y_TD = self.dispatcher.combine(y_ND, meta)
        stats = MoEStats(meta.routed_E, meta.kept_E, aux_loss=routing.aux_loss,
                         z_loss=routing.z_loss, seq_aux_loss=routing.seq_aux_loss,
                         capacity=meta.capacity)
        return y_TD.view_as(x_BSD), stats
