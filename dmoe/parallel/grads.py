"""Gradient reduction and the global gradient norm for the plain torch engine.

Communication (all inside `reduce_gradients` / `global_grad_norm`):
  dense parameters       all-reduce mean over the data-parallel group
  TP-partial parameters  (each TP rank saw a different token slice, e.g. the router under
                          TP+EP) all-reduce sum over TP first
  expert parameters      all-reduce sum over the expert-data-parallel
                          group, then / dp: each rank's expert grads already hold the
                          contributions of every EP peer's tokens, so summing over the ranks
                          holding the same experts and dividing by dp gives the gradient of
                          the DP-mean loss.
Grads are flattened into buckets (one all-reduce per ~bucket_mb) per group. Which
parameter is which: dmoe.parallel.param_roles.
"""
from __future__ import annotations

import math

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from dmoe.parallel import comm_trace
from dmoe.parallel.comm_trace import CommTag
from dmoe.parallel.layout import ProcessGroups
from dmoe.parallel.param_roles import is_expert, is_tp_partial, is_tp_sharded


def _allreduce_bucketed(grads: list[torch.Tensor], group, scale: float, bucket_mb: float = 25.0,
                        name: str = "grads"):
    limit = int(bucket_mb * 2**20)
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= limit):
            flat = _flatten_dense_tensors(bucket)
            comm_trace.all_reduce(flat, group=group, tag=CommTag(name))
            if scale != 1.0:
                flat.mul_(scale)
            for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                dst.copy_(src)
            bucket, size = [], 0


def reduce_gradients(params: list[torch.nn.Parameter], groups: ProcessGroups) -> None:
    params = [p for p in params if p.grad is not None]
    dp = groups.size("dp")
    tp_partial = [p.grad for p in params if is_tp_partial(p)]
    if tp_partial and groups.size("tp") > 1:
        _allreduce_bucketed(tp_partial, groups.tp, 1.0, name="tp_partial_grads")
    dense = [p.grad for p in params if not is_expert(p)]
    expert = [p.grad for p in params if is_expert(p)]
    if dense and dp > 1:
        _allreduce_bucketed(dense, groups.dp, 1.0 / dp, name="dp_grads")
    if expert and (groups.size("edp") > 1 or dp > 1):
        _allreduce_bucketed(expert, groups.edp, 1.0 / dp, name="edp_grads")


def global_grad_norm(params: list[torch.nn.Parameter], groups: ProcessGroups) -> torch.Tensor:
    """L2 norm of the full (unsharded) gradient, identical on every rank."""
    sq = {"replicated": 0.0, "tp": 0.0, "ep": 0.0}
    for p in params:
        if p.grad is None:
            continue
        kind = "ep" if is_expert(p) else "tp" if is_tp_sharded(p) else "replicated"
        sq[kind] = sq[kind] + p.grad.detach().double().square().sum()
    device = next(iter(params)).device if params else torch.device("cpu")
    total = torch.as_tensor(sq["replicated"], device=device, dtype=torch.float64)
    for kind in ("tp", "ep"):
        part = torch.as_tensor(sq[kind], device=device, dtype=torch.float64).clone()
        if groups.size(kind) > 1:
            comm_trace.all_reduce(part, group=getattr(groups, kind), tag=CommTag("grad_norm"))
        total = total + part
    return total.sqrt()


def clip_gradients(params: list[torch.nn.Parameter], groups: ProcessGroups, max_norm: float) -> float:
    params = list(params)
    norm = global_grad_norm(params, groups)
    if max_norm > 0 and math.isfinite(float(norm)):
        coef = max_norm / (float(norm) + 1e-6)
        if coef < 1:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return float(norm)
