"""Differentiable uneven all-to-all over the first dimension.

Shape legend: N rows, D row width (any trailing shape).

    out_ND = all_to_all(x_ND, output_splits, input_splits, group)

Rank i sends rows [sum(input_splits[:j]), +input_splits[j]) of x to rank j and receives
output_splits[j] rows from rank j, stacked in source-rank order. Communication happens
once in forward and once in backward: the gradient goes back along the same routes, so
backward is the same collective with the two split lists swapped. Every rank of `group`
must call it (in forward and, if any rank backpropagates through it, in backward), even
with zero rows to send or receive.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dmoe.parallel import comm_trace
from dmoe.parallel.comm_trace import CommTag


def _exchange(x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group,
              tag: CommTag | None = None):
    out_ND = x_ND.new_empty((sum(output_splits),) + tuple(x_ND.shape[1:]))
    comm_trace.all_to_all_single(
        out_ND, x_ND.contiguous(), output_split_sizes=list(output_splits),
        input_split_sizes=list(input_splits), group=group, tag=tag or CommTag("all_to_all"),
    )
    return out_ND


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, output_splits, input_splits, group, tag=None):
        ctx.splits, ctx.group, ctx.tag = (list(output_splits), list(input_splits)), group, tag
        return _exchange(x_ND, output_splits, input_splits, group, tag)

    @staticmethod
    def backward(ctx, grad_out_ND):
        output_splits, input_splits = ctx.splits
        # Rows travelled input -> output; their gradients travel output -> input.
        grad_x_ND = _AllToAll.apply(grad_out_ND, input_splits, output_splits, ctx.group, ctx.tag)
        return grad_x_ND, None, None, None, None


def all_to_all(
    x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int],
    group: dist.ProcessGroup | None = None, tag: CommTag | None = None,
) -> torch.Tensor:
    """Autograd all_to_all_single with uneven splits (Python int lists, one per rank).

    `tag` names the call for dmoe.parallel.comm_trace (backward reuses it)."""
    if sum(input_splits) != x_ND.shape[0]:
        raise ValueError(f"input_splits sum to {sum(input_splits)}, x has {x_ND.shape[0]} rows")
    return _AllToAll.apply(x_ND, output_splits, input_splits, group, tag)
