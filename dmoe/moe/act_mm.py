"""y = act(h) @ w2 per expert as one autograd node that keeps h for backward, not act(h).

Shape legend: N rows (grouped by expert), H first-matmul width (F for GELU, 2F for SwiGLU),
F expert ffn dim, O output width (the model dim D), E local experts, n rows of one expert.

The unfused expert formulations ("loop", "torch_grouped_mm") ran
`mm(act(h_NH), w2_EFO)` as two autograd nodes: the activation kept h_NH and the matmul
kept a_NF = act(h_NH), so N x (H + F) floats lived until backward reached them, and all of
them were alive when the first stacked weight gradient [E, F, O] was allocated. This node
keeps h_NH only and recomputes a_NF in backward (one elementwise pass; the values are the
forward's bit for bit), writes the activation's gradient over the matmul's input gradient
in place (GELU), and, being a separate node from the first matmul, lets autograd free h_NH
before the first matmul's backward allocates the other stacked gradient. Outputs and
gradients are bit-identical to the two-node composition (tests/unit/test_act_mm.py).

Two backends, the same as the first matmul's: a Python loop of torch.mm per expert
(writing each expert's weight gradient into a slice of one stacked tensor) or
torch._grouped_mm with cumulative int32 offsets (its autograd formulas, called directly).
No communication.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .mlp_math import act_backward, act_forward, blocked_mm, group_offsets, weight_grad_buffer


class _ActMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NH, w_EFO, counts, activation, grouped):
        a_NF = act_forward(h_NH, activation)
        if grouped:
            y_NO = torch._grouped_mm(a_NF, w_EFO, offs=group_offsets(counts, h_NH.device))
        else:
            y_NO = blocked_mm(a_NF, w_EFO, counts)
        ctx.save_for_backward(h_NH, w_EFO)  # saved-tensor hooks (checkpointing) see both
        ctx.counts, ctx.activation, ctx.grouped = counts, activation, grouped
        return y_NO

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_NO):
        h_NH, w_EFO = ctx.saved_tensors
        grad_NO = grad_NO.contiguous()  # an expanded dL/dy (y.sum().backward()) has strides 0
        need_h, need_w = ctx.needs_input_grad[:2]
        counts, activation = ctx.counts, ctx.activation
        a_NF = act_forward(h_NH, activation)  # recomputed, as in the forward
        offs = group_offsets(counts, h_NH.device) if ctx.grouped else None
        grad_w = grad_a = None
        if need_w:
            if ctx.grouped:
                grad_w = torch._grouped_mm(a_NF.t(), grad_NO, offs=offs)
            else:
                grad_w = weight_grad_buffer(w_EFO, counts)
                start = 0
                for e, n in enumerate(counts):
                    if n:
                        rows = slice(start, start + n)
                        torch.mm(a_NF[rows].t(), grad_NO[rows], out=grad_w[e])
                    start += n
        del a_NF
        if not need_h:
            return None, grad_w, None, None, None
        if ctx.grouped:
            grad_a = torch._grouped_mm(grad_NO, w_EFO.transpose(-2, -1), offs=offs)
        else:
            grad_a = h_NH.new_empty(h_NH.shape[0], w_EFO.shape[1])
            start = 0
            for e, n in enumerate(counts):
                if n:
                    rows = slice(start, start + n)
                    torch.mm(grad_NO[rows], w_EFO[e].t(), out=grad_a[rows])
                start += n
        return act_backward(grad_a, h_NH, activation, inplace=True), grad_w, None, None, None


def act_mm(h_NH: torch.Tensor, w_EFO: torch.Tensor, counts: list[int], activation: str,
           grouped: bool) -> torch.Tensor:
    """act(h) @ w[e] over each expert's rows (counts[e] rows for expert e, in order);
    grouped: torch._grouped_mm (no row padding: the caller pads or falls back), else a
    loop of torch.mm."""
    return _ActMM.apply(h_NH, w_EFO, counts, activation, grouped)
