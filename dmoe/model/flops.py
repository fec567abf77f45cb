"""Parameter counts and training FLOPs per token of the model a Config describes, from the
config alone (no model is built): what `dmoe train --dry-run` prints and what MFU divides.

    counts = count_params(cfg)          # ParamCounts(total, expert, dense, embedding, active_per_token)
    flops = train_flops_per_token(cfg)  # forward + backward, per trained token

Conventions (the tests check both against a built MoETransformer and torch's FlopCounterMode):
- a multiply-accumulate is 2 FLOPs; backward costs twice the forward (training = 3x forward);
- every matmul a token passes through counts: attention qkv and output projections, the
  dense MLP, the router, top_k routed experts (capacity drops are not subtracted), shared
  experts and their gate, and the LM head; embedding lookups, norms, biases, activations
  and the softmax do not;
- attention scores (q.k) and values (p.v) count every one of the seq_len positions, as
  PaLM's 6N + 12*L*H*R*S estimate does (a causal kernel does about half of that work).
"""
from __future__ import annotations

from dataclasses import dataclass

from dmoe.config import Config

BYTE_VOCAB = 256


@dataclass(frozen=True)
class ParamCounts:
    """total: every parameter (a tied LM head counted once); expert: the routed experts'
    weights (all of them, over every EP rank); dense: total - expert (embeddings, attention,
    norms, dense MLPs, routers, shared experts, LM head); embedding: the token (and learned
    position) tables; active_per_token: what one token uses, dense + top_k / E of expert."""

    total: int
    expert: int
    dense: int
    embedding: int
    active_per_token: int


def vocab_size(cfg: Config) -> int:
    """model.vocab_size, or when 0 the tokenizer's: 256 bytes or data.bpe_vocab_size."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    return BYTE_VOCAB if cfg.data.tokenizer == "byte" else cfg.data.bpe_vocab_size


def _moe_blocks(cfg: Config) -> int:
    e = cfg.moe
    return sum(1 for i in range(cfg.model.n_layers) if i >= e.first_dense_layers and (i + 1) % e.every == 0)


def _mlp_weights(d_model: int, d_ff: int, activation: str) -> int:
    """fc1 (2 * d_ff rows for SwiGLU's [gate; up]) and fc2, without biases."""
    return d_model * d_ff * (3 if activation == "swiglu" else 2)


def _head_dims(cfg: Config) -> tuple[int, int, int]:
    m = cfg.model
    return m.n_heads, m.n_kv_heads or m.n_heads, m.head_dim or m.d_model // m.n_heads


def _attention_weights(cfg: Config) -> int:
    """qkv and proj matmul weights of one block."""
    H, G, R = _head_dims(cfg)
    return cfg.model.d_model * (H + 2 * G) * R + H * R * cfg.model.d_model


def _shared_weights(cfg: Config) -> int:
    """The shared experts' matmul weights beside one MoE FFN (and their gate's)."""
    e, D = cfg.moe, cfg.model.d_model
    if not e.num_shared_experts:
        return 0
    width = e.num_shared_experts * (e.shared_expert_ffn_dim or e.expert_ffn_dim)
    return _mlp_weights(D, width, e.activation) + (D if e.shared_expert_gate else 0)


def _small_params(cfg: Config) -> tuple[int, int]:
    """(per block, per MoE block) parameters outside the matmul weights: norms, biases,
    q/k norms; the shared experts' biases and the router's expert bias."""
    m, e = cfg.model, cfg.moe
    H, G, R = _head_dims(cfg)
    norm = m.d_model * (1 if m.norm == "rmsnorm" else 2)
    block = 2 * norm + (2 * R if m.qk_norm else 0)
    block += (H + 2 * G) * R if (m.qkv_bias or m.bias) else 0
    block += m.d_model if m.bias else 0  # attention output bias
    moe = e.num_experts if e.bias_update_rate > 0 else 0
    if e.num_shared_experts and m.bias:
        width = e.num_shared_experts * (e.shared_expert_ffn_dim or e.expert_ffn_dim)
        moe += (2 * width if e.activation == "swiglu" else width) + m.d_model
    return block, moe


def _dense_mlp_params(cfg: Config) -> int:
    m = cfg.model
    bias = ((2 * m.ffn_dim if m.mlp_activation == "swiglu" else m.ffn_dim) + m.d_model) if m.bias else 0
    return _mlp_weights(m.d_model, m.ffn_dim, m.mlp_activation) + bias


def count_params(cfg: Config) -> ParamCounts:
    """The parameters of MoETransformer(cfg), counted from the config."""
    m, e = cfg.model, cfg.moe
    V, D, L = vocab_size(cfg), m.d_model, m.n_layers
    n_moe = _moe_blocks(cfg)
    embedding = V * D + (m.seq_len * D if m.positions == "learned" else 0)
    head = 0 if m.tie_embeddings else V * D
    final_norm = D * (1 if m.norm == "rmsnorm" else 2)
    small_block, small_moe = _small_params(cfg)
    per_expert = _mlp_weights(D, e.expert_ffn_dim, e.activation)
    expert = n_moe * e.num_experts * per_expert
    dense = (embedding + head + final_norm + L * (_attention_weights(cfg) + small_block)
             + (L - n_moe) * _dense_mlp_params(cfg)
             + n_moe * (D * e.num_experts + _shared_weights(cfg) + small_moe))
    active = dense + n_moe * e.top_k * per_expert
    return ParamCounts(total=dense + expert, expert=expert, dense=dense, embedding=embedding,
                       active_per_token=active)


def forward_matmul_params(cfg: Config) -> int:
    """Matmul weights one token passes through in a forward (each used once): 2x this is
    its forward FLOPs outside attention's scores and values."""
    m, e = cfg.model, cfg.moe
    D, n_moe = m.d_model, _moe_blocks(cfg)
    moe_ffn = D * e.num_experts + e.top_k * _mlp_weights(D, e.expert_ffn_dim, e.activation)
    dense_ffn = _mlp_weights(D, m.ffn_dim, m.mlp_activation)
    return (m.n_layers * _attention_weights(cfg) + (m.n_layers - n_moe) * dense_ffn
            + n_moe * (moe_ffn + _shared_weights(cfg)) + D * vocab_size(cfg))


def attention_flops_per_token(cfg: Config, seq_len: int | None = None) -> float:
    """Forward q.k and p.v FLOPs of one token over all layers, all seq_len positions."""
    H, _, R = _head_dims(cfg)
    return 4.0 * cfg.model.n_layers * H * R * (seq_len or cfg.model.seq_len)


def forward_flops_per_token(cfg: Config, seq_len: int | None = None) -> float:
    return 2.0 * forward_matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


def train_flops_per_token(cfg: Config, seq_len: int | None = None) -> float:
    """Forward + backward FLOPs per trained token: 3x the forward (see the module doc).
    seq_len: the attended length when it is not model.seq_len."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)
