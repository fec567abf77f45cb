"""Autograd collectives for tensor parallelism, each over an explicit `group`.

Every function here is a pair of collectives (forward, backward) chosen so that the
*replicated region* of a TP model keeps one invariant: activations there are identical on
every TP rank, and so are their gradients. Sharded activations live between a pair of
these functions and carry only this rank's part of the gradient.

    function                fwd                    bwd
    copy_to_region          identity               all-reduce (sum)
    reduce_from_region      all-reduce (sum)       identity
    gather_last_dim         all-gather, cat dim -1 keep own slice of dim -1
    split_last_dim          keep own slice of -1   all-gather, cat dim -1
    gather_first_dim        all-gather, cat dim 0  keep own slice of dim 0
    split_first_dim         keep own slice of 0    all-gather, cat dim 0

The first-dim pair is for the token dimension where TP meets the MoE layer: every TP rank
holds the same tokens, routes only its slice, and the slices are gathered afterwards. Its
backward keeps (rather than reduce-scatters) because the gradient arriving from the
replicated region is already complete on every rank.

Splits need the dimension to divide evenly by the group size; gathers need every rank's
piece to have the same shape. With a group of size 1 all of these are the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dmoe.parallel import comm_trace
from dmoe.parallel.comm_trace import CommTag


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    out = x.contiguous().clone()
    comm_trace.all_reduce(out, group=group, tag=CommTag("tp_all_reduce"))
    return out


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    comm_trace.all_gather(parts, x, group=group, tag=CommTag("tp_all_gather"))
    return torch.cat(parts, dim=dim)


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(
            f"dimension {dim} of size {x.shape[dim]} must be divisible by "
            f"the TP group size ({world})"
        )
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


class _CopyToRegion(torch.autograd.Function):
    """fwd: identity. bwd: all-reduce, summing the partial input grads of the TP shards."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """fwd: all-reduce the partial outputs. bwd: identity (the grad is already complete)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Gather(torch.autograd.Function):
    """fwd: all-gather along `dim`. bwd: keep this rank's slice of the (complete) grad."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group), None, None


class _Split(torch.autograd.Function):
    """fwd: keep this rank's slice along `dim`. bwd: all-gather the slices' grads."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


def copy_to_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Enter a TP region (e.g. before a column-parallel matmul). Backward: all-reduce."""
    return _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Leave a TP region by summing partial results. Forward: all-reduce."""
    return _ReduceFromRegion.apply(x, group)


def gather_last_dim(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate the ranks' feature shards. Forward: all-gather; backward: split."""
    return _Gather.apply(x, -1, group)


def split_last_dim(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's feature shard. Forward: no communication; backward: all-gather."""
    return _Split.apply(x, -1, group)


def gather_first_dim(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate the ranks' token slices. Forward: all-gather; backward: split."""
    return _Gather.apply(x, 0, group)


def split_first_dim(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's token slice. Forward: no communication; backward: all-gather."""
    return _Split.apply(x, 0, group)
