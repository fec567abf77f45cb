"""Tiny random Hugging Face models built locally (nothing downloads), and the hooks that
read which experts each router chose, on both sides. Needs transformers (dmoe[hf]).

    hf = save_tiny("qwen3_moe", tmp_path / "hf")        # saved with save_pretrained
    logits, chosen = hf_forward(hf, ids_BS)             # chosen: per MoE layer [T, K] sorted

Weights are redrawn wider than transformers' init (std 0.02 would leave router scores
nearly tied, and a rounding difference could then flip a choice): N(0, 0.15) linears,
norm weights near 1, routers N(0, 1).
"""
from __future__ import annotations

import torch
from torch import nn

VOCAB, SEQ = 96, 16

# 3-4 layers, a few experts, GQA where the family has it; each family's own options on
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def hf_config(family: str):
    """The tiny config of a family, from transformers' own config classes."""
    import transformers as tf

    if family == "mixtral":
        return tf.MixtralConfig(**COMMON, intermediate_size=24, num_hidden_layers=3,
                                num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6)
    if family == "qwen2_moe":  # qkv bias, a gated shared expert, gates not renormalised, block 0 dense
        return tf.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=40, num_hidden_layers=3,
                                 num_experts=8, num_experts_per_tok=3, norm_topk_prob=False,
                                 mlp_only_layers=[0])
    if family == "qwen3_moe":  # q/k norm, head_dim 12 (not 32 / 4), renormalised, MoE every 2nd block
        return tf.Qwen3MoeConfig(**COMMON, head_dim=12, intermediate_size=48, moe_intermediate_size=16,
                                 num_hidden_layers=4, num_experts=8, num_experts_per_tok=2,
                                 norm_topk_prob=True, decoder_sparse_step=2)
    dense = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[family]
    return dense(**COMMON, intermediate_size=48, num_hidden_layers=3)


MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


def build_tiny(family: str, seed: int = 0, **changes) -> nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = hf_config(family)
    for key, value in changes.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".gate.weight"):  # routers
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 0.15)
    return model.eval()


def save_tiny(family: str, path, seed: int = 0, dtype=torch.float32, **changes) -> nn.Module:
    model = build_tiny(family, seed, **changes)
    model.to(dtype).save_pretrained(path)
    return model


def tokens(seed: int = 1, rows: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


def _sorted(idx_TK: torch.Tensor) -> torch.Tensor:
    return idx_TK.sort(-1).values


@torch.no_grad()
def hf_forward(model: nn.Module, ids_BS: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and each MoE layer's chosen experts [T, K] (sorted per token)."""
    chosen, hooks = [], []
    for layer in model.model.layers:
        router = getattr(layer.mlp, "gate", None)
        if router is not None and not isinstance(router, nn.Linear):
            hooks.append(router.register_forward_hook(lambda m, a, out: chosen.append(_sorted(out[2]))))
    try:
        logits = model(ids_BS).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, chosen


def record_routes(model: nn.Module) -> tuple[list, list]:
    """Hooks on every dmoe router appending its chosen experts [T, K] (sorted); returns
    (records, handles)."""
    from dmoe.moe.router import TopKRouter

    records, handles = [], []
    for module in model.modules():
        if isinstance(module, TopKRouter):
            handles.append(module.register_forward_hook(
                lambda m, a, out: records.append(_sorted(out.expert_idx_TK))))
    return records, handles


@torch.no_grad()
def dmoe_forward(model: nn.Module, ids_BS: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    records, handles = record_routes(model)
    try:
        logits = model(ids_BS).logits
    finally:
        for h in handles:
            h.remove()
    return logits, records


def to_float64(model: nn.Module, islands: bool = True) -> nn.Module:
    """The HF model in float64 (eager experts: torch._grouped_mm takes no float64).

    transformers still computes three things in float32 in a float64 model: RMSNorm, the
    RoPE tables and the router softmax. islands=False swaps those for float64 versions
    (same formulas), to show what is left when both sides really run in float64."""
    import types

    import torch.nn.functional as F

    model = model.double()
    model.set_experts_implementation("eager")
    if islands:
        return model

    def norm(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rope(self, x, position_ids):
        dim = self.inv_freq.numel() * 2
        inv_freq = 1.0 / self.config.rope_parameters["rope_theta"] ** (
            torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        freqs = position_ids[..., None].double() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def route(self, h):
        logits = F.linear(h.reshape(-1, self.hidden_dim), self.weight)
        top, idx = torch.topk(torch.softmax(logits, -1), self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):  # mixtral always renormalises
            top = top / top.sum(-1, keepdim=True)
        return logits, top, idx

    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm"):
            module.forward = types.MethodType(norm, module)
        elif kind.endswith("RotaryEmbedding"):
            module.forward = types.MethodType(rope, module)
        elif kind.endswith("TopKRouter"):
            module.forward = types.MethodType(route, module)
    return model
