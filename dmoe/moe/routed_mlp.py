"""Gather, expert MLPs and gate-weighted combine in one autograd node (the local, CPU path).

Shape legend: T tokens, D model dim, F expert ffn dim, H first-matmul width (F for GELU,
2F for SwiGLU), E local experts, N kept (token, expert) rows in expert order, n rows of
one expert.

    out_TD[t] = sum over kept rows r of token t: gate_N[r] * mlp_e(x_TD[t])

The unfused path (dispatcher gather -> experts -> combine) writes the dispatched rows
x_ND, reads them back, keeps them for backward, and in backward writes and re-reads a
[N, D] gradient and scatters it: four to six passes over [N, D] that exist only to feed
the GEMMs. Here each expert gathers its own rows straight from x_TD into a block that is
read at once by the first GEMM (the gather rides on that GEMM's input read, at cache
size), and the second GEMM's rows are gate-scaled and index-added into out_TD while still
in cache; backward gathers dL/dy per expert the same way and index-adds dL/dx per expert.
Nothing [N, D] is kept except the unscaled expert outputs y (the gate's gradient is
<dL/dy_t, y_r>); of the [n, F] intermediates only the pre-activation h is kept, and
backward recomputes act(h) per expert (bit-identical; one GELU over an expert's rows
costs ~1/7 of one of its GEMMs) rather than keep N x F floats more alive at backward's
start. Rows are visited, and accumulated into out_TD and dL/dx_TD, in the same order as
the unfused path, so the results are bit-for-bit the same.

No communication: this runs only for LocalDispatcher (all experts on this rank).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .mlp_math import act_backward, act_forward, weight_grad_buffer


class _RoutedExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, gate_N, w1_EDH, w2_EFD, token_idx_N, counts, activation):
        out_TD = x_TD.new_zeros(x_TD.shape[0], w2_EFD.shape[2])
        y_ND = x_TD.new_empty(token_idx_N.shape[0], w2_EFD.shape[2])
        saved_h = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                tok_n = token_idx_N[rows]
                h_nH = torch.mm(x_TD.index_select(0, tok_n), w1_EDH[e])
                y_nD = torch.mm(act_forward(h_nH, activation), w2_EFD[e], out=y_ND[rows])
                out_TD.index_add_(0, tok_n, y_nD * gate_N[rows, None])
                saved_h.append(h_nH)
            start += n
        # everything through save_for_backward: saved-tensor hooks (checkpointing) see it
        ctx.save_for_backward(x_TD, gate_N, w1_EDH, w2_EFD, token_idx_N, y_ND, *saved_h)
        ctx.counts, ctx.activation = counts, activation
        return out_TD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD):
        x_TD, gate_N, w1_EDH, w2_EFD, token_idx_N, y_ND, *saved_h = ctx.saved_tensors
        need_x, need_gate, need_w1, need_w2 = ctx.needs_input_grad[:4]
        grad_x = torch.zeros_like(x_TD) if need_x else None
        grad_gate = torch.empty_like(gate_N) if need_gate else None
        grad_w1 = weight_grad_buffer(w1_EDH, ctx.counts) if need_w1 else None
        grad_w2 = weight_grad_buffer(w2_EFD, ctx.counts) if need_w2 else None
        start, i = 0, 0
        for e, n in enumerate(ctx.counts):
            if not n:
                continue
            rows = slice(start, start + n)
            tok_n, h_nH = token_idx_N[rows], saved_h[i]
            g_nD = grad_TD.index_select(0, tok_n)  # dL/d(gate * y), then dL/dy in place
            if need_gate:
                torch.sum(g_nD * y_ND[rows], dim=1, out=grad_gate[rows])
            g_nD.mul_(gate_N[rows, None])
            if need_w2:
                torch.mm(act_forward(h_nH, ctx.activation).t(), g_nD, out=grad_w2[e])
            grad_h = act_backward(torch.mm(g_nD, w2_EFD[e].t()), h_nH, ctx.activation)
            if need_x:
                grad_x.index_add_(0, tok_n, torch.mm(grad_h, w1_EDH[e].t()))
            if need_w1:
                torch.mm(x_TD.index_select(0, tok_n).t(), grad_h, out=grad_w1[e])
            start, i = start + n, i + 1
        return grad_x, grad_gate, grad_w1, grad_w2, None, None, None


def routed_expert_mlp(x_TD: torch.Tensor, token_idx_N: torch.Tensor, gate_N: torch.Tensor,
                      w1_EDH: torch.Tensor, w2_EFD: torch.Tensor, counts: list[int],
                      activation: str) -> torch.Tensor:
    """out_TD (see the module doc). token_idx_N / gate_N: the kept rows in expert order,
    counts[e] of them for expert e; x_TD, the weights and the gates in one dtype."""
    return _RoutedExpertMLP.apply(x_TD, gate_N, w1_EDH, w2_EFD, token_idx_N, counts, activation)
