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


# ------------------------------------------------------------------ split-phase (async)
class InFlight:
    """The pending work of one split-phase all-to-all: `fwd` between start and wait in
    forward, `bwd` (work, receive buffer, sent tensor) between the two halves' backwards
    (which run in the opposite order)."""

    __slots__ = ("bwd", "fwd")

    def __init__(self):
        self.fwd = self.bwd = None


class _Start(torch.autograd.Function):
    """Forward issues the all-to-all (async) into a fresh buffer; backward waits for the
    gradient exchange that `_Wait`'s backward issued."""

    @staticmethod
    def forward(ctx, x_ND, output_splits, input_splits, group, tag, flight):
        out_ND = x_ND.new_empty((sum(output_splits),) + tuple(x_ND.shape[1:]))
        flight.fwd = comm_trace.all_to_all_single(
            out_ND, x_ND.contiguous(), list(output_splits), list(input_splits), group=group,
            tag=tag, async_op=True)
        ctx.flight = flight
        return out_ND

    @staticmethod
    def backward(ctx, _):
        # the incoming gradient is _Wait.backward's pass-through; the real one is arriving
        work, grad_x_ND, _sent = ctx.flight.bwd
        work.wait()
        ctx.flight.bwd = None
        return grad_x_ND, None, None, None, None, None


class _Wait(torch.autograd.Function):
    """Forward waits for `_Start`'s exchange; backward issues the gradient's exchange
    (splits swapped, async) into a buffer that `_Start.backward` waits for and returns."""

    @staticmethod
    def forward(ctx, out_ND, output_splits, input_splits, group, tag, flight):
        flight.fwd.wait()
        flight.fwd = None
        ctx.splits, ctx.group, ctx.tag, ctx.flight = (output_splits, input_splits), group, tag, flight
        return out_ND.view_as(out_ND)

    @staticmethod
    def backward(ctx, grad_out_ND):
        output_splits, input_splits = ctx.splits
        grad_x_ND = grad_out_ND.new_empty((sum(input_splits),) + tuple(grad_out_ND.shape[1:]))
        sent_ND = grad_out_ND.contiguous()
        work = comm_trace.all_to_all_single(
            grad_x_ND, sent_ND, list(input_splits), list(output_splits),
            group=ctx.group, tag=ctx.tag, async_op=True)
        ctx.flight.bwd = (work, grad_x_ND, sent_ND)  # sent_ND alive until the wait
        return sent_ND, None, None, None, None, None


def start_all_to_all(x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int],
                     group, tag: CommTag) -> tuple[torch.Tensor, InFlight]:
    """Split-phase `all_to_all`: issues it and returns (buffer, flight) at once; read the
    rows only through `wait_all_to_all(buffer, flight, ...)`. In backward the two halves
    swap roles: the wait's backward issues the gradient exchange, the start's backward
    waits for it, so the compute that autograd runs between them overlaps it."""
    if sum(input_splits) != x_ND.shape[0]:
        raise ValueError(f"input_splits sum to {sum(input_splits)}, x has {x_ND.shape[0]} rows")
    flight = InFlight()
    return _Start.apply(x_ND, output_splits, input_splits, group, tag, flight), flight


def wait_all_to_all(out_ND: torch.Tensor, flight: InFlight, output_splits: list[int],
                    input_splits: list[int], group, tag: CommTag) -> torch.Tensor:
    """The received rows of `start_all_to_all` (same splits, group and tag)."""
    return _Wait.apply(out_ND, output_splits, input_splits, group, tag, flight)
