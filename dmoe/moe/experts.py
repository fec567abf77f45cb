"""Stacked expert FFNs run as one grouped matmul over expert-contiguous rows.

Shape legend: N rows (grouped by expert), D model dim, F expert ffn dim, E local experts.

All local experts' weights live in single tensors (w1_EDF or w13_ED2F for SwiGLU, w2_EFD).
`grouped_mm` is one autograd node for all experts: its backward writes each expert's
weight gradient into a slice of one stacked tensor, so backward stays O(E). (Indexing
`w[e]` per expert under autograd would instead allocate and sum E full-size gradients.)
Rows that were dropped or never routed are never computed: there is no padding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("gelu", "swiglu")
EXPERT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class _GroupedMM(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e] for every expert e; counts say the row blocks."""

    @staticmethod
    def forward(ctx, x_NI, w_EIO, counts):
        y_NO = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[2])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(x_NI[start : start + n], w_EIO[e], out=y_NO[start : start + n])
            start += n
        ctx.save_for_backward(x_NI, w_EIO)
        ctx.counts = counts
        return y_NO

    @staticmethod
    def backward(ctx, grad_NO):
        x_NI, w_EIO = ctx.saved_tensors
        grad_NO = grad_NO.contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x_NI) if need_x else None
        grad_w = torch.zeros_like(w_EIO) if need_w else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if n:
                rows = slice(start, start + n)
                if need_x:
                    torch.mm(grad_NO[rows], w_EIO[e].t(), out=grad_x[rows])
                if need_w:
                    torch.mm(x_NI[rows].t(), grad_NO[rows], out=grad_w[e])
            start += n
        return grad_x, grad_w, None


def grouped_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: list[int]) -> torch.Tensor:
    return _GroupedMM.apply(x_NI, w_EIO, counts)


class GroupedExperts(nn.Module):
    """E expert MLPs (GELU or SwiGLU), no biases, fp32 master weights.

    compute_dtype=bfloat16 casts rows and weights for the matmuls and returns fp32 rows;
    the weights and their gradients stay fp32.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu",
                 compute_dtype: str = "float32"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"moe.activation ({activation!r}) must be one of {ACTIVATIONS}")
        if compute_dtype not in EXPERT_DTYPES:
            raise ValueError(f"moe.expert_dtype ({compute_dtype!r}) must be one of {tuple(EXPERT_DTYPES)}")
        self.activation, self.compute_dtype = activation, EXPERT_DTYPES[compute_dtype]
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, width))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.w1, std=1 / math.sqrt(self.d_model))
        nn.init.normal_(self.w2, std=1 / math.sqrt(self.d_ff))

    def forward(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        dtype = self.compute_dtype
        w1, w2 = self.w1.to(dtype), self.w2.to(dtype)
        h_NF = grouped_mm(x_ND.to(dtype), w1, counts)
        if self.activation == "swiglu":
            gate_NF, up_NF = h_NF.chunk(2, dim=-1)
            h_NF = F.silu(gate_NF) * up_NF
        else:
            h_NF = F.gelu(h_NF)
        return grouped_mm(h_NF, w2, counts).to(x_ND.dtype)
