"""Per-expert MLP pieces shared by the expert formulations (experts.py, routed_mlp.py).

Shape legend: n rows of one expert, H first-matmul width (F for GELU, 2F for SwiGLU),
F expert ffn dim, E local experts, I/O a matmul's input/output width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def group_offsets(counts: list[int], device: torch.device) -> torch.Tensor:
    """torch._grouped_mm's offs: the int32 end row of each expert's block, on the device."""
    return torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)


def blocked_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e], a torch.mm per expert with rows (no autograd)."""
    y_NO = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[2])
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(x_NI[start : start + n], w_EIO[e], out=y_NO[start : start + n])
        start += n
    return y_NO


def weight_grad_buffer(w_EIO: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Uninitialised stacked gradient; only experts with no rows are zeroed (saves a memset)."""
    grad_w = torch.empty_like(w_EIO)
    for e, n in enumerate(counts):
        if not n:
            grad_w[e].zero_()
    return grad_w


def act_forward(h_nH: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate_nF, up_nF = h_nH.chunk(2, dim=-1)
        return F.silu(gate_nF) * up_nF
    return F.gelu(h_nH)


def act_backward(grad_nF: torch.Tensor, h_nH: torch.Tensor, activation: str,
                 inplace: bool = False) -> torch.Tensor:
    """d loss / d h from d loss / d act(h), in the layout of h. inplace: GELU writes it
    over grad_nF (the same values; one [n, F] buffer fewer)."""
    if activation != "swiglu":
        if inplace:
            return torch.ops.aten.gelu_backward.grad_input(grad_nF, h_nH, grad_input=grad_nF)
        return torch.ops.aten.gelu_backward(grad_nF, h_nH)
    gate_nF, up_nF = h_nH.chunk(2, dim=-1)
    grad_nH = torch.empty_like(h_nH)
    torch.mul(grad_nF, F.silu(gate_nF), out=grad_nH[:, gate_nF.shape[1] :])
    grad_nH[:, : gate_nF.shape[1]] = torch.ops.aten.silu_backward(grad_nF * up_nF, gate_nF)
    return grad_nH
