"""A decoder-only transformer whose FFN is an MoE layer every `moe.every` blocks.

Pre-norm blocks, causal attention (scaled_dot_product_attention), rotary or learned
positions. The model holds no process groups: dmoe.parallel applies TP/EP afterwards.
Shape legend: B batch, S sequence, D model dim, H heads, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dmoe.config import Config
from dmoe.moe.dispatcher import CapacitySettings
from dmoe.moe.layer import MoELayer, MoEStats


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles_SR = torch.outer(torch.arange(seq_len).float(), inv_freq)
    return angles_SR.cos(), angles_SR.sin()


def apply_rotary(x_BHSR2: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHSR2[..., 0::2], x_BHSR2[..., 1::2]
    out = torch.stack((x1 * cos_SR - x2 * sin_SR, x1 * sin_SR + x2 * cos_SR), dim=-1)
    return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, rotary: bool):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.dropout, self.rotary = dropout, rotary

    def forward(self, x_BSD, rope=None):
        B, S, _ = x_BSD.shape
        # heads on this rank follow from the (possibly TP-sharded) qkv width
        q, k, v = self.qkv(x_BSD).view(B, S, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary:
            cos, sin = rope
            q, k = apply_rotary(q, cos[:S], sin[:S]), apply_rotary(k, cos[:S], sin[:S])
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, -1))


class CrossEntropy(nn.Module):
    """The model's criterion slot: plain cross-entropy over full-vocabulary logits (TP swaps
    in a vocab-parallel one, dmoe.parallel.tensor_parallel.layers)."""

    def forward(self, logits_TV: torch.Tensor, targets_T: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_TV, targets_T)


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff, bias=False)
        self.fc2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: Config, use_moe: bool):
        super().__init__()
        m, e = cfg.model, cfg.moe
        self.ln1, self.ln2 = nn.LayerNorm(m.d_model), nn.LayerNorm(m.d_model)
        self.attn = Attention(m.d_model, m.n_heads, m.dropout, m.positions == "rotary")
        if use_moe:
            capacity = CapacitySettings(
                e.capacity_factor, e.eval_capacity_factor, e.min_capacity, e.drop_policy
            )
            self.ffn = MoELayer(
                m.d_model, e.num_experts, e.top_k, e.expert_ffn_dim, capacity, e.activation,
                e.router_jitter, e.normalize_topk, e.expert_dtype,
            )
        else:
            self.ffn = MLP(m.d_model, m.ffn_dim)
        self.drop = nn.Dropout(m.dropout)

    def forward(self, x, rope):
        x = x + self.drop(self.attn(self.ln1(x), rope))
        h = self.ffn(self.ln2(x))
        stats = None
        if isinstance(h, tuple):
            h, stats = h
        return x + self.drop(h), stats


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # cross-entropy + weighted aux losses (what to backprop)
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # mean over MoE layers
    z_loss: torch.Tensor | None = None
    moe_stats: list[MoEStats] = field(default_factory=list)


class MoETransformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.tok_emb = nn.Embedding(m.vocab_size, m.d_model)
        self.pos_emb = nn.Embedding(m.seq_len, m.d_model) if m.positions == "learned" else None
        self.blocks = nn.ModuleList(
            Block(cfg, use_moe=(i + 1) % cfg.moe.every == 0) for i in range(m.n_layers)
        )
        self.ln_f = nn.LayerNorm(m.d_model)
        self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        self.apply(self._init_weights)
        if m.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if m.positions == "rotary":
            cos, sin = rotary_tables(m.seq_len, m.d_model // m.n_heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        # scaled init of residual projections (GPT-2)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * m.n_layers))
        self.criterion: nn.Module = CrossEntropy()

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None) -> ModelOutput:
        x = self.tok_emb(idx_BS)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(idx_BS.shape[1], device=idx_BS.device))
        rope = (self.rope_cos, self.rope_sin) if self.pos_emb is None else None
        stats = []
        for block in self.blocks:
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
            moe = self.cfg.moe
            loss = loss + moe.aux_loss_coef * out.aux_loss + moe.z_loss_coef * out.z_loss
        out.loss = loss
        return out

    def num_params(self) -> dict:
        expert = sum(p.numel() for n, p in self.named_parameters() if ".experts." in n)
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "expert": expert, "dense": total - expert}
