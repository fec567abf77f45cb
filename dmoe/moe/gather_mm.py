"""h = x_TD[token_idx_N] @ w1 per expert, as one autograd node that keeps x_TD, not the
gathered rows.

Shape legend: T tokens, D model dim, H first-matmul width, E local experts, N kept
(token, expert) rows in expert order, n rows of one expert.

The unfused local path gathered x_ND = x_TD[token_idx_N] (N x D, k copies of every
token) and the first matmul kept it for its weight gradient, so it was alive from the
forward to the end of the experts' backward; the gather's backward then needed an [N, D]
gradient that was index-added into dL/dx_TD. Here the gathered block is a forward-only
temporary and nothing [N, D] is kept from the forward to the backward. The forward's
matmul is torch._grouped_mm (grouped) or a loop of torch.mm. Backward with the loop:
per expert, re-gather that expert's rows from x_TD for its weight gradient and index-add
its dL/dx rows straight into dL/dx_TD. With torch._grouped_mm: its own formulas on whole
blocks, one [N, D] temporary at a time (dL/dx_ND before its index-add, then the
re-gathered rows); per expert it measured ~6% slower per layer step at 64 rows per
expert. Either way rows are accumulated in the unfused path's order: bit for bit the
same results (tests/unit/test_routed_mlp.py). No communication.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .mlp_math import blocked_mm, group_offsets, weight_grad_buffer


class _GatherMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_EDH, token_idx_N, counts, grouped):
        x_ND = x_TD.index_select(0, token_idx_N)
        if grouped:
            h_NH = torch._grouped_mm(x_ND, w_EDH, offs=group_offsets(counts, x_TD.device))
        else:
            h_NH = blocked_mm(x_ND, w_EDH, counts)
        ctx.save_for_backward(x_TD, w_EDH, token_idx_N)
        ctx.counts, ctx.grouped = counts, grouped
        return h_NH

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_NH):
        x_TD, w_EDH, token_idx_N = ctx.saved_tensors
        grad_NH = grad_NH.contiguous()
        need_x, need_w = ctx.needs_input_grad[:2]
        if ctx.grouped:
            return _grouped_backward(x_TD, w_EDH, token_idx_N, ctx.counts, grad_NH, need_x, need_w)
        grad_x = torch.zeros_like(x_TD) if need_x else None
        grad_w = weight_grad_buffer(w_EDH, ctx.counts) if need_w else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if n:
                rows = slice(start, start + n)
                tok_n, g_nH = token_idx_N[rows], grad_NH[rows]
                if need_x:
                    grad_x.index_add_(0, tok_n, torch.mm(g_nH, w_EDH[e].t()))
                if need_w:
                    torch.mm(x_TD.index_select(0, tok_n).t(), g_nH, out=grad_w[e])
            start += n
        return grad_x, grad_w, None, None, None


def _grouped_backward(x_TD, w_EDH, token_idx_N, counts, grad_NH, need_x, need_w):
    """torch._grouped_mm's own gradient formulas on whole blocks (a per-expert loop of mm
    measured ~6% slower per layer step at 64 rows per expert): dL/dx_ND first, index-added
    into dL/dx_TD and dropped, then the gathered rows again for the weight gradient, so
    at most one [N, D] temporary is alive while the stacked gradient exists."""
    offs = group_offsets(counts, x_TD.device)
    grad_x = grad_w = None
    if need_x:
        grad_x = torch.zeros_like(x_TD).index_add_(
            0, token_idx_N, torch._grouped_mm(grad_NH, w_EDH.transpose(-2, -1), offs=offs))
    if need_w:
        grad_w = torch._grouped_mm(x_TD.index_select(0, token_idx_N).t(), grad_NH, offs=offs)
    return grad_x, grad_w, None, None, None


def gather_mm(x_TD: torch.Tensor, w_EDH: torch.Tensor, token_idx_N: torch.Tensor,
              counts: list[int], grouped: bool) -> torch.Tensor:
    """x_TD[token_idx_N] @ w[e] over each expert's rows (counts[e] rows for expert e, in
    order); grouped: torch._grouped_mm in the forward (no row padding), else torch.mm."""
    return _GatherMM.apply(x_TD, w_EDH, token_idx_N, counts, grouped)
