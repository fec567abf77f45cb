"""A decoder-only transformer whose FFN is an MoE layer every `moe.every` blocks.

Pre-norm blocks (LayerNorm or RMSNorm), causal attention with grouped-query heads
(scaled_dot_product_attention), optional q/k RMSNorm (Qwen3), rotary (rotate-half, as
Llama/Mixtral/Qwen) or learned positions, dense MLP GELU or SwiGLU, optional shared
experts beside the routed ones (Qwen2-MoE / DeepSeek), the first blocks optionally dense
(DeepSeek's first_k_dense_replace). The model holds no process groups: dmoe.parallel
applies TP/EP afterwards.
Shape legend: B batch, S sequence, D model dim, H query heads, G key/value heads,
R head dim, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dmoe.config import Config
from dmoe.moe.dispatcher import CapacitySettings
from dmoe.moe.layer import MoELayer, MoEStats


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [S, R] for the rotate-half convention (frequencies repeated twice), in
    float64: apply_rotary casts them to the activations' dtype."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles_SR2 = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    angles_SR = torch.cat([angles_SR2, angles_SR2], dim=-1)
    return angles_SR.cos(), angles_SR.sin()


def apply_rotary(x_BHSR: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] of x's two halves."""
    x1, x2 = x_BHSR.chunk(2, dim=-1)
    cos_SR, sin_SR = cos_SR.to(x_BHSR.dtype), sin_SR.to(x_BHSR.dtype)
    return x_BHSR * cos_SR + torch.cat([-x2, x1], dim=-1) * sin_SR


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in at least float32 (as Llama, Mixtral and Qwen do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


class Attention(nn.Module):
    """Causal self-attention with H query heads sharing G key/value heads (G = H: MHA).

    qkv is one packed projection [q (H*R); k (G*R); v (G*R)]; TP splits each of the three
    chunks by whole heads (dmoe.parallel.plan), so a rank's q heads use its own k/v heads.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float, rotary: bool,
                 n_kv_heads: int | None = None, qkv_bias: bool = False, bias: bool = False,
                 qk_norm: bool = False, norm_eps: float = 1e-6, head_dim: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads  # R; may differ from D / H (Qwen3)
        self.qkv = nn.Linear(d_model, (n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.dropout, self.rotary = dropout, rotary

    def qkv_chunks(self) -> int | tuple[int, ...]:
        """The packed blocks of qkv's output rows, for the sharding plan."""
        if self.n_kv_heads == self.n_heads:
            return 3
        kv = self.n_kv_heads * self.head_dim
        return (self.n_heads * self.head_dim, kv, kv)

    def forward(self, x_BSD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        # heads on this rank follow from the (possibly TP-sharded) qkv width
        group = self.n_heads // self.n_kv_heads  # query heads per key/value head
        qkv_BSN = self.qkv(x_BSD)
        kv_heads = qkv_BSN.shape[-1] // self.head_dim // (group + 2)
        q, k, v = qkv_BSN.split([group * kv_heads * self.head_dim, kv_heads * self.head_dim,
                                 kv_heads * self.head_dim], dim=-1)
        q_BHSR = q.view(B, S, -1, self.head_dim).transpose(1, 2)
        k_BGSR = k.view(B, S, -1, self.head_dim).transpose(1, 2)
        v_BGSR = v.view(B, S, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q_BHSR, k_BGSR = self.q_norm(q_BHSR), self.k_norm(k_BGSR)
        if self.rotary:
            cos, sin = rope
            q_BHSR, k_BGSR = apply_rotary(q_BHSR, cos[:S], sin[:S]), apply_rotary(k_BGSR, cos[:S], sin[:S])
        if group > 1:
            k_BGSR = k_BGSR.repeat_interleave(group, dim=1)
            v_BGSR = v_BGSR.repeat_interleave(group, dim=1)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q_BHSR, k_BGSR, v_BGSR, dropout_p=p, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, -1))


class CrossEntropy(nn.Module):
    """The model's criterion slot: plain cross-entropy over full-vocabulary logits (TP swaps
    in a vocab-parallel one, dmoe.parallel.tensor_parallel.layers)."""

    def forward(self, logits_TV: torch.Tensor, targets_T: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_TV, targets_T)


class MLP(nn.Module):
    """fc2(act(fc1(x))): GELU, or SwiGLU with fc1 packing [gate; up] (2 * d_ff rows)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = False):
        super().__init__()
        self.activation = activation
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.fc1 = nn.Linear(d_model, width, bias=bias)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)

    def fc1_chunks(self) -> int:
        """The packed blocks of fc1's output rows, for the sharding plan."""
        return 2 if self.activation == "swiglu" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * up)
        return self.fc2(F.gelu(h))


class SharedExpert(nn.Module):
    """Always-on expert(s) beside the routed ones: one MLP of num_shared * ffn width,
    optionally scaled by a sigmoid gate of the input (Qwen2-MoE's shared_expert_gate).
    Dense parameters: TP-sharded like the dense MLP, reduced over DP, never EP."""

    def __init__(self, d_model: int, d_ff: int, activation: str, gated: bool, bias: bool = False):
        super().__init__()
        self.mlp = MLP(d_model, d_ff, activation, bias)
        self.gate = nn.Linear(d_model, 1, bias=False) if gated else None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        y_BSD = self.mlp(x_BSD)
        if self.gate is not None:
            y_BSD = torch.sigmoid(self.gate(x_BSD)) * y_BSD
        return y_BSD


class Block(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)) (+ the shared expert's output beside a MoE
    FFN). Returns the MoE layer's stats, or None for a dense block."""

    def __init__(self, cfg: Config, use_moe: bool):
        super().__init__()
        m, e = cfg.model, cfg.moe
        self.ln1 = make_norm(m.norm, m.d_model, m.norm_eps)
        self.ln2 = make_norm(m.norm, m.d_model, m.norm_eps)
        self.attn = Attention(m.d_model, m.n_heads, m.dropout, m.positions == "rotary",
                              m.n_kv_heads or m.n_heads, m.qkv_bias or m.bias, m.bias, m.qk_norm,
                              m.norm_eps, m.head_dim)
        self.shared_expert = None
        if use_moe and e.num_shared_experts:
            width = e.num_shared_experts * (e.shared_expert_ffn_dim or e.expert_ffn_dim)
            self.shared_expert = SharedExpert(m.d_model, width, e.activation, e.shared_expert_gate,
                                              m.bias)
        if use_moe:
            capacity = CapacitySettings(
                e.capacity_factor, e.eval_capacity_factor, e.min_capacity, e.drop_policy
            )
            self.ffn = MoELayer(
                m.d_model, e.num_experts, e.top_k, e.expert_ffn_dim, capacity, e.activation,
                e.router_jitter, e.normalize_topk, expert_dtype(cfg),
                e.score_func, e.route_scale, e.num_groups, e.topk_groups, e.bias_update_rate,
                recompute_experts=cfg.train.activation_checkpointing == "experts",
                experts_impl=e.experts_impl,
            )
        else:
            self.ffn = MLP(m.d_model, m.ffn_dim, m.mlp_activation, m.bias)
        self.drop = nn.Dropout(m.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, MoEStats | None]:
        x = x + self.drop(self.attn(self.ln1(x), rope))
        h_in = self.ln2(x)
        h = self.ffn(h_in)
        stats = None
        if isinstance(h, tuple):
            h, stats = h
        if self.shared_expert is not None:
            h = h + self.shared_expert(h_in)
        return x + self.drop(h), stats


def expert_dtype(cfg: Config) -> str:
    """moe.expert_dtype, with auto read as the run's compute dtype: bfloat16 under
    train.precision=bf16 (rows and, under DeepSpeed bf16, weights are bf16 already: no fp32
    copy per forward), else float32."""
    if cfg.moe.expert_dtype != "auto":
        return cfg.moe.expert_dtype
    return "bfloat16" if cfg.train.precision == "bf16" else "float32"


def is_moe_block(cfg: Config, i: int) -> bool:
    """Block i holds a MoE FFN: past moe.first_dense_layers, every moe.every-th block."""
    return i >= cfg.moe.first_dense_layers and (i + 1) % cfg.moe.every == 0


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # cross-entropy + weighted aux losses (what to backprop)
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # mean over MoE layers
    z_loss: torch.Tensor | None = None
    seq_aux_loss: torch.Tensor | None = None  # mean over MoE layers
    moe_stats: list[MoEStats] = field(default_factory=list)


class MoETransformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.tok_emb = nn.Embedding(m.vocab_size, m.d_model)
        self.pos_emb = nn.Embedding(m.seq_len, m.d_model) if m.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, use_moe=is_moe_block(cfg, i)) for i in range(m.n_layers))
        self.ln_f = make_norm(m.norm, m.d_model, m.norm_eps)
        self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        self.apply(self._init_weights)
        if m.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if m.positions == "rotary":
            head_dim = m.head_dim or m.d_model // m.n_heads
            cos, sin = rotary_tables(m.seq_len, head_dim, m.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        # scaled init of residual projections (GPT-2)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * m.n_layers))
        self.criterion: nn.Module = CrossEntropy()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None) -> ModelOutput:
        x = self.tok_emb(idx_BS)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(idx_BS.shape[1], device=idx_BS.device))
        rope = (self.rope_cos, self.rope_sin) if self.pos_emb is None else None
        stats = []
        recompute = self.cfg.train.activation_checkpointing == "block" and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:  # every collective in the block (TP, all-to-all) reruns in backward
                x, s = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x, s = block(x, rope)
            if s is not None:
                stats.append(s)
        logits = self.lm_head(self.ln_f(x))
        out = ModelOutput(logits=logits, moe_stats=stats)
        if targets_BS is None:
            return out
        logits_TV = logits.flatten(0, 1)
        if logits_TV.dtype in (torch.float16, torch.bfloat16):
            logits_TV = logits_TV.float()  # the softmax in at least fp32
        out.ce_loss = self.criterion(logits_TV, targets_BS.flatten())
        loss = out.ce_loss
        if stats:
            out.aux_loss = torch.stack([s.aux_loss for s in stats]).mean()
            out.z_loss = torch.stack([s.z_loss for s in stats]).mean()
            out.seq_aux_loss = torch.stack([s.seq_aux_loss for s in stats]).mean()
            moe = self.cfg.moe
            loss = loss + moe.aux_loss_coef * out.aux_loss + moe.z_loss_coef * out.z_loss
            loss = loss + moe.seq_aux_loss_coef * out.seq_aux_loss
        out.loss = loss
        return out

    def num_params(self) -> dict:
        expert = sum(p.numel() for n, p in self.named_parameters() if ".experts." in n)
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "expert": expert, "dense": total - expert}
