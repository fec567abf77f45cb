"""Stacked expert FFNs over expert-contiguous rows.

Shape legend: N rows (grouped by expert), D model dim, F expert ffn dim, H first-matmul
width (F for GELU, 2F for SwiGLU), E local experts, n rows of one expert.

All local experts' weights live in single tensors (w1_EDH, w2_EFD). Three formulations, same
results (bench/moe_layer.py --impls fused,loop,torch_grouped_mm compares them):

- "fused": one autograd node for the whole MLP that walks the experts and runs
  matmul -> activation -> matmul on each expert's rows, then the mirror image in backward.
  Its temporaries are per expert, so it never allocates the [N, H] activations whole; it
  keeps each expert's pre-activation h and recomputes act(h) in backward. On the local
  path it also gathers and combines (routed_mlp.py).
- "loop": a grouped matmul (`grouped_mm`, a Python loop of torch.mm), then act(h) @ w2 as
  one node that keeps h, not act(h) (act_mm.py).
- "torch_grouped_mm": the same with torch._grouped_mm (a C++ loop of mm on CPU; fp32/bf16).
- "auto" (default): on CPU the formulation measured fastest at the nearest (rows per
  expert, local experts, d_model, d_ff) in impl_table.py; on CUDA "torch_grouped_mm" for
  bf16 on sm90+ (rows per expert padded to 16-byte alignment), else "loop". Chosen per
  run with moe.experts_impl. (With glibc's default malloc, which page-faults every block
  over 32 MiB back in on each step, "fused" measured 5-20% faster than the other two on
  2026-11-29; the table was measured with the caching malloc settings of bench/README.md.)

In every formulation each expert's weight gradient is written into a slice of one stacked tensor, so
backward stays O(E) (indexing `w[e]` per expert under autograd would instead allocate and
sum E full-size gradients). Rows that were dropped or never routed are never computed.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .act_mm import act_mm
from .dispatcher import combine_rows
from .gather_mm import gather_mm
from .impl_table import nearest_cpu_impl
from .mlp_math import act_backward as _act_backward
from .mlp_math import act_forward as _act_forward
from .mlp_math import blocked_mm, group_offsets
from .mlp_math import weight_grad_buffer as _weight_grad_buffer
from .routed_mlp import routed_expert_mlp

ACTIVATIONS = ("gelu", "swiglu")
EXPERT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IMPLS = ("auto", "fused", "loop", "torch_grouped_mm")


def _warn_if_slow_bf16(cpu_capability: str) -> None:
    """bf16 matmuls on a CPU without BF16/AMX units ran ~50x slower than fp32 in
    bench/moe_layer.py (AVX2 Zen 3). Python's warnings filter shows it once per process."""
    if "BF16" not in cpu_capability and "AMX" not in cpu_capability:
        warnings.warn(f"moe.expert_dtype=bfloat16 on a {cpu_capability} CPU: no bf16 matmul "
                      "units, expect it to be far slower than float32", stacklevel=3)


class _GroupedMM(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e] for every expert e; counts say the row blocks."""

    @staticmethod
    def forward(ctx, x_NI, w_EIO, counts):
        y_NO = blocked_mm(x_NI, w_EIO, counts)
        ctx.save_for_backward(x_NI, w_EIO)
        ctx.counts = counts
        return y_NO

    @staticmethod
    def backward(ctx, grad_NO):
        x_NI, w_EIO = ctx.saved_tensors
        grad_NO = grad_NO.contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x_NI) if need_x else None
        grad_w = _weight_grad_buffer(w_EIO, ctx.counts) if need_w else None
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
    """Per-expert x @ w over expert-contiguous rows (Python loop of torch.mm)."""
    return _GroupedMM.apply(x_NI, w_EIO, counts)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: torch._grouped_mm's
    backward refuses an expanded one (`y.sum().backward()` hands it strides [0, 0])."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def torch_grouped_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: list[int],
                     row_multiple: int | None = None) -> torch.Tensor:
    """The same through torch._grouped_mm (cumulative int32 offsets, on x's device).

    On CUDA every expert's row block must start 16-byte aligned, so rows per expert are
    padded to a multiple of 16 / element size (8 for bf16) with zero rows, which are dropped
    from the result (row_multiple overrides; 1 = no padding, the CPU default)."""
    if row_multiple is None:
        row_multiple = max(1, 16 // x_NI.element_size()) if x_NI.device.type == "cuda" else 1
    padded = [-(-n // row_multiple) * row_multiple for n in counts]
    offs_E = group_offsets(padded, x_NI.device)
    if padded == counts:
        return _ContiguousGrad.apply(torch._grouped_mm(x_NI, w_EIO, offs=offs_E))
    # row n of expert e goes to n + (padding of the experts before e): built on the device
    # from two small host lists (no host sync; repeat_interleave is told its output size)
    shift, acc = [], 0
    for n, p in zip(counts, padded):
        shift.append(acc)
        acc += p - n
    dest_N = torch.arange(x_NI.shape[0], device=x_NI.device) + torch.repeat_interleave(
        torch.tensor(shift, device=x_NI.device), torch.tensor(counts, device=x_NI.device),
        output_size=x_NI.shape[0])
    x_PI = x_NI.new_zeros(sum(padded), x_NI.shape[1]).index_copy(0, dest_N, x_NI)
    return torch._grouped_mm(x_PI, w_EIO, offs=offs_E).index_select(0, dest_N)


def _needs_row_padding(x_NI: torch.Tensor, counts: list[int]) -> bool:
    """Whether torch_grouped_mm would pad rows per expert (CUDA's 16-byte alignment)."""
    multiple = max(1, 16 // x_NI.element_size()) if x_NI.device.type == "cuda" else 1
    return any(n % multiple for n in counts)


def pick_impl(device_type: str, dtype: torch.dtype, n_rows: int, num_local: int,
              widths: tuple[int, ...], capability: tuple[int, int] | None = None) -> str:
    """What impl="auto" runs (see the module docstring).

    CUDA: torch._grouped_mm (one kernel for all experts) for bf16 on sm90+ (its CUTLASS
    kernel's requirement), else the loop of mm. CPU: the formulation measured fastest at
    the nearest shape (impl_table.py); torch._grouped_mm only where it applies (fp32/bf16,
    16-byte aligned widths, a non-empty batch). widths: (d_model, d_ff, first-matmul width)."""
    aligned = all(w % 8 == 0 for w in widths) and n_rows > 0
    if device_type == "cuda":
        sm90 = capability is not None and capability >= (9, 0)
        return "torch_grouped_mm" if dtype == torch.bfloat16 and sm90 and aligned else "loop"
    if device_type != "cpu":
        return "loop"
    if n_rows == 0:
        return "fused"
    grouped_ok = dtype in (torch.float32, torch.bfloat16) and aligned
    allowed = ("fused", "loop", "torch_grouped_mm") if grouped_ok else ("fused", "loop")
    return nearest_cpu_impl(n_rows / max(1, num_local), num_local, widths[0], widths[1], allowed)


class _ExpertMLP(torch.autograd.Function):
    """y[rows of e] = act(x[rows of e] @ w1[e]) @ w2[e], expert by expert.

    Saves each expert's pre-activation h only, not its activation a = act(h): backward
    recomputes a per expert (one GELU / SiLU*up over that expert's rows, bit-identical to
    the forward's), which keeps N x F floats fewer alive while the stacked weight gradients
    are allocated (bench/README.md, peak memory).
    """

    @staticmethod
    def forward(ctx, x_ND, w1_EDH, w2_EFD, counts, activation):
        y_ND = x_ND.new_empty(x_ND.shape[0], w2_EFD.shape[2])
        saved_h = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                h_nH = torch.mm(x_ND[rows], w1_EDH[e])
                torch.mm(_act_forward(h_nH, activation), w2_EFD[e], out=y_ND[rows])
                saved_h.append(h_nH)
            start += n
        # Intermediates go through save_for_backward too, so saved-tensor hooks (activation
        # checkpointing, offload) see them.
        ctx.save_for_backward(x_ND, w1_EDH, w2_EFD, *saved_h)
        ctx.counts, ctx.activation = counts, activation
        return y_ND

    @staticmethod
    def backward(ctx, grad_ND):
        x_ND, w1_EDH, w2_EFD, *saved_h = ctx.saved_tensors
        grad_ND = grad_ND.contiguous()
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x_ND) if need_x else None
        grad_w1 = _weight_grad_buffer(w1_EDH, ctx.counts) if need_w1 else None
        grad_w2 = _weight_grad_buffer(w2_EFD, ctx.counts) if need_w2 else None
        start, i = 0, 0
        for e, n in enumerate(ctx.counts):
            if not n:
                continue
            rows = slice(start, start + n)
            h_nH, g_nD = saved_h[i], grad_ND[rows]
            if need_w2:
                torch.mm(_act_forward(h_nH, ctx.activation).t(), g_nD, out=grad_w2[e])
            grad_h = _act_backward(torch.mm(g_nD, w2_EFD[e].t()), h_nH, ctx.activation)
            if need_x:
                torch.mm(grad_h, w1_EDH[e].t(), out=grad_x[rows])
            if need_w1:
                torch.mm(x_ND[rows].t(), grad_h, out=grad_w1[e])
            start, i = start + n, i + 1
        return grad_x, grad_w1, grad_w2, None, None


class GroupedExperts(nn.Module):
    """E expert MLPs (GELU or SwiGLU), no biases, fp32 master weights.

    compute_dtype=bfloat16 casts rows and weights for the matmuls and returns rows in the
    input dtype; the weights and their gradients stay fp32 (the casts' backward converts).
    impl picks the formulation (see the module docstring); all give the same results.
    recompute=True keeps only the rows and weights for backward and recomputes the expert
    MLPs' activations there (train.activation_checkpointing=experts): the dispatch around
    the experts, and its all-to-all, runs once.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu",
                 compute_dtype: str = "float32", impl: str = "auto", recompute: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"moe.activation ({activation!r}) must be one of {ACTIVATIONS}")
        if compute_dtype not in EXPERT_DTYPES:
            raise ValueError(f"moe.expert_dtype ({compute_dtype!r}) must be one of {tuple(EXPERT_DTYPES)}")
        if impl not in IMPLS:
            raise ValueError(f"moe.experts_impl ({impl!r}) must be one of {IMPLS}")
        self.activation, self.compute_dtype, self.impl = activation, EXPERT_DTYPES[compute_dtype], impl
        self.recompute = recompute
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, width))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.w1, std=1 / math.sqrt(self.d_model))
        nn.init.normal_(self.w2, std=1 / math.sqrt(self.d_ff))

    def resolve_impl(self, x_ND: torch.Tensor, counts: list[int], dtype: torch.dtype | None = None) -> str:
        """self.impl, or for "auto" what `pick_impl` chooses for these rows in `dtype` (the
        compute dtype: autocast's or moe.expert_dtype). x_ND gives the device; the rows
        are sum(counts) (x may be the undispatched x_TD of a routed call)."""
        if self.impl != "auto":
            return self.impl
        capability = (torch.cuda.get_device_capability(x_ND.device)
                      if x_ND.device.type == "cuda" else None)
        return pick_impl(x_ND.device.type, dtype or self.compute_dtype, sum(counts), len(counts),
                         (self.d_model, self.d_ff, self.w1.shape[2]), capability)

    # LocalDispatcher.dispatch_combine may hand these experts undispatched tokens (below)
    takes_routed_rows = True

    def forward(self, x_ND: torch.Tensor, counts: list[int], token_idx_N: torch.Tensor | None = None,
                gate_N: torch.Tensor | None = None) -> torch.Tensor:
        """y_ND = the experts on expert-contiguous rows (counts[e] rows for expert e).

        With token_idx_N and gate_N, x is the undispatched x_TD and the call also gathers
        and combines: y_TD[t] = sum of gate_N[r] * mlp(x_TD[t]) over the kept rows r of
        token t (token_idx_N, gate_N in expert order). The "fused" formulation runs that
        as one node (routed_mlp.py); the others gather, run the experts and combine.
        Either way it is one module call, so hooks on the experts see (x, counts)."""
        if token_idx_N is None:
            return self._run(self._forward, x_ND, counts)
        return self._run(self._forward_routed, x_ND, counts, token_idx_N, gate_N)

    def _run(self, fn, x: torch.Tensor, counts: list[int], *rest) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # the custom autograd nodes write into preallocated outputs: give them one
            # explicit dtype (autocast's) instead of letting autocast recast per matmul
            with torch.autocast(device_type, enabled=False):
                return self._maybe_recompute(fn, x, counts, torch.get_autocast_dtype(device_type), *rest)
        return self._maybe_recompute(fn, x, counts, self.compute_dtype, *rest)

    def _maybe_recompute(self, fn, x: torch.Tensor, counts: list[int], dtype: torch.dtype, *rest):
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(fn, x, counts, dtype, *rest, use_reentrant=False)
        return fn(x, counts, dtype, *rest)

    def _forward_routed(self, x_TD: torch.Tensor, counts: list[int], dtype: torch.dtype,
                        token_idx_N: torch.Tensor, gate_N: torch.Tensor) -> torch.Tensor:
        impl = self.resolve_impl(x_TD, counts, dtype)
        grouped = impl == "torch_grouped_mm"
        if dtype != x_TD.dtype or (grouped and _needs_row_padding(x_TD, counts)):
            y_ND = self._forward(x_TD.index_select(0, token_idx_N), counts, dtype)
            return combine_rows(y_ND, token_idx_N, gate_N, x_TD.shape[0])
        if dtype == torch.bfloat16 and x_TD.device.type == "cpu":
            _warn_if_slow_bf16(torch.backends.cpu.get_cpu_capability())
        w1, w2 = self.w1.to(dtype), self.w2.to(dtype)
        if impl == "fused":
            return routed_expert_mlp(x_TD, token_idx_N, gate_N.to(dtype), w1, w2, counts,
                                     self.activation)
        # neither the gathered rows nor act(h) kept for backward (gather_mm.py, act_mm.py)
        h_NH = gather_mm(x_TD, w1, token_idx_N, counts, grouped)
        y_ND = act_mm(h_NH, w2, counts, self.activation, grouped)
        return combine_rows(y_ND, token_idx_N, gate_N, x_TD.shape[0])

    def _forward(self, x_ND: torch.Tensor, counts: list[int], dtype: torch.dtype) -> torch.Tensor:
        if dtype == torch.bfloat16 and x_ND.device.type == "cpu":
            _warn_if_slow_bf16(torch.backends.cpu.get_cpu_capability())
        x_cast, w1, w2 = x_ND.to(dtype), self.w1.to(dtype), self.w2.to(dtype)
        impl = self.resolve_impl(x_ND, counts, dtype)
        if impl == "fused":
            y_ND = _ExpertMLP.apply(x_cast, w1, w2, counts, self.activation)
        else:
            mm = grouped_mm if impl == "loop" else torch_grouped_mm
            h_NH = mm(x_cast, w1, counts)
            grouped = impl == "torch_grouped_mm"
            if grouped and _needs_row_padding(x_cast, counts):  # CUDA: torch_grouped_mm pads
                y_ND = mm(_act_forward(h_NH, self.activation), w2, counts)
            else:  # keeps h only, not act(h) (act_mm.py)
                y_ND = act_mm(h_NH, w2, counts, self.activation, grouped)
        return y_ND.to(x_ND.dtype)
