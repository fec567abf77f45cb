"""What bench/moe_layer.py (one process) and bench/moe_layer_ep.py (EP over gloo ranks)
share: the case constants, DeepSpeed's MoE layer built with dmoe's weights, the bare-expert
limit, and one forward + backward of a layer. Neither script imports the other's module
for these (moe_layer.py hands `--ep 2` runs to moe_layer_ep.run)."""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dmoe.moe.layer import MoELayer  # noqa: E402

D_MODEL, D_FF, MIN_CAPACITY = 256, 1024, 4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class BenchExpert(nn.Module):
    """DeepSpeed's expert for these runs: two bias-free nn.Linear with GELU (or SwiGLU).

    Weights stay fp32; like dmoe's experts it casts rows and weights to `dtype` for the
    matmuls (a no-op in float32) and hands back the input dtype.
    """

    def __init__(self, activation: str, dtype: torch.dtype):
        super().__init__()
        width = 2 * D_FF if activation == "swiglu" else D_FF
        self.fc1 = nn.Linear(D_MODEL, width, bias=False)
        self.fc2 = nn.Linear(D_FF, D_MODEL, bias=False)
        self.activation, self.dtype = activation, dtype

    def forward(self, x):
        h = F.linear(x.to(self.dtype), self.fc1.weight.to(self.dtype))
        return F.linear(activate(h, self.activation), self.fc2.weight.to(self.dtype)).to(x.dtype)


def activate(h, activation):
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def init_deepspeed():
    """One-rank gloo group plus DeepSpeed's expert groups (MoE.set_deepspeed_parallelism)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(name, value)
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout to JSON lines
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def build_deepspeed(layer: MoELayer, k, cf, activation, dtype, ep_size=1, first_expert=0):
    """DeepSpeed MoE with dmoe's router and expert weights, so both route identically.

    With ep_size > 1 it holds experts [first_expert, first_expert + E / ep_size) of the
    full (unsharded) `layer`. use_rts=False and top2_2nd_expert_sampling=False: no random
    token selection and no Gumbel noise on the second choice (dmoe has neither).
    Dropless = drop_tokens=False.
    """
    from deepspeed.moe.layer import MoE

    num_experts = layer.router.num_experts
    ds = MoE(D_MODEL, BenchExpert(activation, dtype), num_experts=num_experts, k=k,
             capacity_factor=cf or 1.0, eval_capacity_factor=cf or 1.0, min_capacity=MIN_CAPACITY,
             drop_tokens=cf is not None, use_rts=False, top2_2nd_expert_sampling=False,
             ep_size=ep_size)
    with contextlib.redirect_stdout(sys.stderr):  # it prints; stdout is JSON lines only
        ds.set_deepspeed_parallelism()
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(layer.router.gate.weight)
        for e, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            expert.fc1.weight.copy_(layer.experts.w1[first_expert + e].t())
            expert.fc2.weight.copy_(layer.experts.w2[first_expert + e].t())
    return ds


class Limit:
    """The bare expert MLPs on `counts` rows per expert: no router, dispatch or combine."""

    def __init__(self, layer: MoELayer, counts, activation, dtype, gen):
        self.counts, self.activation, self.dtype = counts, activation, dtype
        n = sum(counts)
        self.x = torch.randn(n, D_MODEL, generator=gen).requires_grad_()
        self.grad = torch.randn(n, D_MODEL, generator=gen)
        ex = layer.experts
        # Per-expert nn.Linear-layout weights (separate leaves, like DeepSpeed's ModuleList).
        self.w1s = [ex.w1[e].detach().t().contiguous().requires_grad_() for e in range(ex.num_experts)]
        self.w2s = [ex.w2[e].detach().t().contiguous().requires_grad_() for e in range(ex.num_experts)]
        self.w1 = ex.w1.detach().clone().requires_grad_()
        self.w2 = ex.w2.detach().clone().requires_grad_()
        self.offs = torch.tensor(counts).cumsum(0).to(torch.int32)

    def params(self):
        return [self.x, self.w1, self.w2, *self.w1s, *self.w2s]

    def linear_loop(self):
        dt, ys = self.dtype, []
        for e, x_n in enumerate(self.x.split(self.counts)):
            h = F.linear(x_n.to(dt), self.w1s[e].to(dt))
            ys.append(F.linear(activate(h, self.activation), self.w2s[e].to(dt)))
        torch.cat(ys).float().backward(self.grad)

    def grouped(self):
        dt = self.dtype
        h = torch._grouped_mm(self.x.to(dt), self.w1.to(dt), offs=self.offs)
        y = torch._grouped_mm(activate(h, self.activation), self.w2.to(dt), offs=self.offs)
        y.float().backward(self.grad)


def layer_step(module, x, grad, is_ds):
    if is_ds:
        y, aux, _ = module(x)
    else:
        y, stats = module(x)
        aux = stats.aux_loss
    # Seed backward with `grad` directly (as the limit does): no loss arithmetic is timed.
    torch.autograd.backward((y, aux), (grad, torch.tensor(0.01)))
    return y


def parse_cf(text: str):
    return None if text in ("dropless", "none", "0") else float(text)
