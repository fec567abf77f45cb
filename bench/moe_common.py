"""What bench/moe_layer.py (one process) and bench/moe_layer_ep.py (EP over gloo ranks)
share: the case constants, DeepSpeed's MoE layer built with dmoe's weights, the bare-expert
limit, and one forward + backward of a layer. Neither script imports the other's module
for these (moe_layer.py hands `--ep 2` runs to moe_layer_ep.run)."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dmoe.model.transformer import SharedExpert  # noqa: E402
from dmoe.moe.dispatcher import CapacitySettings  # noqa: E402
from dmoe.moe.layer import MoELayer  # noqa: E402

# D_FF is the default grid's expert width (old results stay comparable); a case may set its
# own (the fine-grained set's, FINE_D_FF in moe_layer.py).
D_MODEL, D_FF, MIN_CAPACITY = 256, 1024, 4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_dmoe(experts, k, cf, d_ff=D_FF, activation="gelu", expert_dtype="float32") -> MoELayer:
    """dmoe's layer as every case builds it, each constructor option spelled out: softmax
    top-k with the top-k gates renormalised (DeepSpeed's gating), no jitter, no groups,
    route scale 1, no loss-free bias, experts not recomputed; drop policy "position"."""
    return MoELayer(D_MODEL, experts, k, d_ff, CapacitySettings(cf, cf, MIN_CAPACITY, "position"),
                    activation=activation, jitter_eps=0.0, normalize_topk=True,
                    expert_dtype=expert_dtype, score_func="softmax", route_scale=1.0,
                    num_groups=1, topk_groups=1, bias_update_rate=0.0, recompute_experts=False)


class BenchExpert(nn.Module):
    """DeepSpeed's expert for these runs: two bias-free nn.Linear with GELU (or SwiGLU).

    Weights stay fp32; like dmoe's experts it casts rows and weights to `dtype` for the
    matmuls (a no-op in float32) and hands back the input dtype.
    """

    def __init__(self, activation: str, dtype: torch.dtype, d_ff: int = D_FF):
        super().__init__()
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.fc1 = nn.Linear(D_MODEL, width, bias=False)
        self.fc2 = nn.Linear(d_ff, D_MODEL, bias=False)
        self.activation, self.dtype = activation, dtype

    def forward(self, x):
        h = F.linear(x.to(self.dtype), self.fc1.weight.to(self.dtype))
        return F.linear(activate(h, self.activation), self.fc2.weight.to(self.dtype)).to(x.dtype)


def activate(h, activation):
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def init_deepspeed(backend="gloo"):
    """One-rank group (gloo; nccl for CUDA tensors, which gloo's all-to-all does not take)
    plus DeepSpeed's expert groups (MoE.set_deepspeed_parallelism)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(name, value)
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout to JSON lines
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, verbose=False)


def deepspeed_gating(k: int) -> str | None:
    """The DeepSpeed gate function that serves top-k, or None where the installed version
    cannot (before topkgating, TopKGate took k in {1, 2} only)."""
    import inspect

    with contextlib.redirect_stdout(sys.stderr):  # keep stdout to JSON lines
        from deepspeed.moe import sharded_moe

    if k in (1, 2):
        return f"top{k}gating"
    forward = inspect.getsource(sharded_moe.TopKGate.forward)
    return "topkgating" if "topkgating(" in forward else None


def build_deepspeed(layer: MoELayer, k, cf, activation, dtype, ep_size=1, first_expert=0):
    """DeepSpeed MoE with dmoe's router and expert weights, so both route identically.

    With ep_size > 1 it holds experts [first_expert, first_expert + E / ep_size) of the
    full (unsharded) `layer`. use_rts=False and top2_2nd_expert_sampling=False: no random
    token selection and no Gumbel noise on the second choice (dmoe has neither).
    Dropless = drop_tokens=False.
    """
    from deepspeed.moe.layer import MoE

    num_experts = layer.router.num_experts
    ds = MoE(D_MODEL, BenchExpert(activation, dtype, layer.experts.d_ff), num_experts=num_experts, k=k,
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


class WithShared(nn.Module):
    """A MoE layer plus an always-on shared MLP on the same input: moe(x) + shared(x), as
    dmoe's transformer Block adds its SharedExpert. Keeps the wrapped layer's return
    shape: (y, stats) for dmoe, (y, l_aux, exp_counts) for DeepSpeed."""

    def __init__(self, moe: nn.Module, shared: nn.Module):
        super().__init__()
        self.moe, self.shared = moe, shared

    def forward(self, x):
        y, *rest = self.moe(x)
        return (y + self.shared(x), *rest)


def build_shared(d_ff_shared, activation):
    """dmoe's SharedExpert (ungated, DeepSeek-style) and DeepSpeed's twin with its weights:
    a BenchExpert of the same width in fp32 (the shared MLP is dense: no expert dtype)."""
    shared = SharedExpert(D_MODEL, d_ff_shared, activation, gated=False)
    twin = BenchExpert(activation, torch.float32, d_ff_shared)
    with torch.no_grad():
        twin.fc1.weight.copy_(shared.mlp.fc1.weight)
        twin.fc2.weight.copy_(shared.mlp.fc2.weight)
    return shared, twin


class Limit:
    """The bare expert MLPs on `counts` rows per expert: no router, dispatch or combine.

    With `shared` (a SharedExpert) it also runs the shared MLP's two GEMMs on `tokens`
    rows, in the same backward.
    """

    def __init__(self, layer: MoELayer, counts, activation, dtype, gen, shared=None, tokens=0,
                 device=None):
        self.counts, self.activation, self.dtype = counts, activation, dtype
        n = sum(counts)
        ex = layer.experts
        dev = device or ex.w1.device
        leaf = lambda t: t.detach().to(dev).clone().requires_grad_()
        # drawn on the CPU generator, then moved: the same values on every device
        self.x = leaf(torch.randn(n, D_MODEL, generator=gen))
        self.grad = torch.randn(n, D_MODEL, generator=gen).to(dev)
        self.shared = []
        if shared is not None:
            self.sx = leaf(torch.randn(tokens, D_MODEL, generator=gen))
            self.sgrad = torch.randn(tokens, D_MODEL, generator=gen).to(dev)
            self.sw1, self.sw2 = leaf(shared.mlp.fc1.weight), leaf(shared.mlp.fc2.weight)
            self.shared = [self.sx, self.sw1, self.sw2]
        # Per-expert nn.Linear-layout weights (separate leaves, like DeepSpeed's ModuleList).
        self.w1s = [leaf(ex.w1[e].t().contiguous()) for e in range(ex.num_experts)]
        self.w2s = [leaf(ex.w2[e].t().contiguous()) for e in range(ex.num_experts)]
        self.w1, self.w2 = leaf(ex.w1), leaf(ex.w2)
        self.offs = torch.tensor(counts).cumsum(0).to(dtype=torch.int32, device=dev)

    def params(self):
        return [self.x, self.w1, self.w2, *self.w1s, *self.w2s, *self.shared]

    def _backward(self, y):
        """Backward of the routed rows' output, together with the shared MLP's (fp32)."""
        if not self.shared:
            return y.float().backward(self.grad)
        y_shared = F.linear(activate(F.linear(self.sx, self.sw1), self.activation), self.sw2)
        torch.autograd.backward((y.float(), y_shared), (self.grad, self.sgrad))

    def linear_loop(self):
        dt, ys = self.dtype, []
        for e, x_n in enumerate(self.x.split(self.counts)):
            h = F.linear(x_n.to(dt), self.w1s[e].to(dt))
            ys.append(F.linear(activate(h, self.activation), self.w2s[e].to(dt)))
        self._backward(torch.cat(ys))

    def grouped(self):
        dt = self.dtype
        h = torch._grouped_mm(self.x.to(dt), self.w1.to(dt), offs=self.offs)
        y = torch._grouped_mm(activate(h, self.activation), self.w2.to(dt), offs=self.offs)
        self._backward(y)


def layer_step(module, x, grad, is_ds):
    """One forward + backward of a layer (dmoe's or DeepSpeed's, either maybe WithShared;
    is_ds="titan": torchtitan's, which returns y alone and has no aux loss)."""
    if is_ds == "titan":
        y = module(x)
        y.backward(grad)
        return y
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


def saved_bytes(fn, params) -> int:
    """Bytes autograd keeps from the forward for the backward during fn(): the distinct
    storages packed by saved-tensor hooks, `params` (the parameters and the input) left
    out. A model with L such layers keeps L times this at the start of its backward."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())


def peak_live_bytes(fn) -> int:
    """High-water mark of live CPU tensor bytes during fn() above the level at its start
    (torch.profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(records, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# ---------------------------------------------------------------- torchtitan (a peer)

# Where bench/install_peers.sh puts torchtitan 0.3.0 (not a dmoe dependency).
PEERS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "peers")


def import_torchtitan():
    """torchtitan's MoE module from PEERS_DIR, or None (one line on stderr) when absent.

    Its token dispatcher imports torchtitan.distributed.minimal_async_ep, which needs
    triton; the local (EP 1) path never calls it, so without triton a stub stands in."""
    import importlib.util
    import types

    if PEERS_DIR not in sys.path:
        sys.path.append(PEERS_DIR)  # last: the venv's own packages win
    if importlib.util.find_spec("torchtitan") is None:
        print(f"torchtitan: not installed (bench/install_peers.sh puts it in {PEERS_DIR}); "
              "skipping that peer", file=sys.stderr)
        return None
    stub = "torchtitan.distributed.minimal_async_ep"
    if importlib.util.find_spec("triton") is None and stub not in sys.modules:
        module = types.ModuleType(stub)
        for name in ("combine_op", "dispatch_op", "init_buffer", "MinimalAsyncEPDispatchMetadata"):
            setattr(module, name, None)
        sys.modules[stub] = module
    with contextlib.redirect_stdout(sys.stderr):
        from torchtitan.models.common import moe

    return moe


def _titan_gelu_experts(experts):
    """torchtitan's GroupedExperts.forward with dmoe's expert MLP: GELU, fp32 (its own
    forward is SwiGLU in bf16), the same torch._grouped_mm calls on its [E, F, D] weights."""
    def forward(x_RD, num_tokens_per_expert_E):
        offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        h_RF = F.gelu(experts._grouped_mm(A=x_RD, B_t=experts.w1_EFD.transpose(-2, -1),
                                          offs=offsets_E))
        return experts._grouped_mm(A=h_RF, B_t=experts.w2_EDF.transpose(-2, -1), offs=offsets_E)
    return forward


def build_torchtitan(layer: MoELayer, k):
    """torchtitan 0.3.0's MoE (token-choice top-k router, argsort local dispatcher,
    torch._grouped_mm experts) with dmoe's router and expert weights: softmax scores,
    top-k renormalised for k > 1 (route_norm; at k=1 both keep the softmax probability as
    the gate), no load-balance bias, GELU fp32 experts. It has no
    capacity: every case runs dropless. Returns None when torchtitan is not installed."""
    moe = import_torchtitan()
    if moe is None:
        return None
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    num_experts, ex = layer.router.num_experts, layer.experts
    cfg = moe.MoE.Config(
        num_experts=num_experts, load_balance_coeff=None,
        routed_experts=moe.RoutedExperts.Config(
            inner_experts=moe.GroupedExperts.Config(dim=D_MODEL, hidden_dim=ex.d_ff,
                                                    num_experts=num_experts),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=num_experts, top_k=k)),
        router=moe.TokenChoiceTopKRouter.Config(
            num_experts=num_experts, gate=Linear.Config(in_features=D_MODEL, out_features=num_experts),
            top_k=k, score_func="softmax", route_norm=k > 1))  # dmoe: a k=1 gate stays p
    # its router's fp32 autocast warns on every CPU forward (a no-op there)
    warnings.filterwarnings("ignore", r"(?s).*CPU Autocast only supports")
    titan = cfg.build().to(ex.w1.device)
    inner = titan.routed_experts.inner_experts
    del inner.w3_EFD  # SwiGLU's third matrix: unused by the GELU expert
    inner.register_parameter("w3_EFD", None)
    with torch.no_grad():
        titan.router.gate.weight.copy_(layer.router.gate.weight)
        inner.w1_EFD.copy_(ex.w1.transpose(1, 2))
        inner.w2_EDF.copy_(ex.w2.transpose(1, 2))
    inner.forward = _titan_gelu_experts(inner)
    return titan
