"""Model options (norms, grouped-query attention, qk-norm, rope theta, biases, SwiGLU MLP,
shared experts, dense first layers) against naive references written here, float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from dmoe.config import ConfigError, load_config
from dmoe.model.transformer import (
    MLP,
    Attention,
    MoETransformer,
    RMSNorm,
    SharedExpert,
    is_moe_block,
)

TOL = 1e-12


def randn(*shape, seed):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def naive_rms(x, weight, eps):
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def test_rmsnorm_matches_formula():
    norm = RMSNorm(6, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(randn(6, seed=1))
    x = randn(3, 4, 6, seed=2)
    assert (norm(x) - naive_rms(x, norm.weight, 1e-5)).abs().max() < TOL


def naive_rope(x_SR, theta):
    """Rotate each pair (x_i, x_{i + R/2}) by position * theta^(-2i/R), one row at a time."""
    S, R = x_SR.shape
    out = x_SR.clone()
    for s in range(S):
        for i in range(R // 2):
            angle = s * theta ** (-2 * i / R)
            a, b = x_SR[s, i], x_SR[s, i + R // 2]
            out[s, i] = a * math.cos(angle) - b * math.sin(angle)
            out[s, i + R // 2] = a * math.sin(angle) + b * math.cos(angle)
    return out


def naive_attention(attn, x_SD, theta, eps):
    """One sequence, head by head: q/k/v slices of qkv, optional q/k RMSNorm, rope, causal
    softmax written out, query head h reading key/value head h // (H / G)."""
    H, G, R = attn.n_heads, attn.n_kv_heads, attn.head_dim
    W, b = attn.qkv.weight, attn.qkv.bias
    qkv = x_SD @ W.t() + (b if b is not None else 0)
    q, k, v = qkv[:, : H * R], qkv[:, H * R: (H + G) * R], qkv[:, (H + G) * R:]
    S = x_SD.shape[0]
    heads = []
    for h in range(H):
        g = h // (H // G)
        qh, kh, vh = q[:, h * R:(h + 1) * R], k[:, g * R:(g + 1) * R], v[:, g * R:(g + 1) * R]
        if attn.q_norm is not None:
            qh, kh = naive_rms(qh, attn.q_norm.weight, eps), naive_rms(kh, attn.k_norm.weight, eps)
        qh, kh = naive_rope(qh, theta), naive_rope(kh, theta)
        scores = qh @ kh.t() / math.sqrt(R)
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(torch.softmax(scores, -1) @ vh)
    y = torch.cat(heads, -1) @ attn.proj.weight.t()
    return y + (attn.proj.bias if attn.proj.bias is not None else 0)


@pytest.mark.parametrize("n_heads,n_kv_heads,qk_norm,bias", [
    (4, 4, False, False), (4, 2, False, False), (4, 1, True, False), (6, 2, True, True),
])
def test_attention_matches_naive(n_heads, n_kv_heads, qk_norm, bias):
    from dmoe.model.transformer import rotary_tables

    D, S, theta, eps = 4 * n_heads, 7, 500.0, 1e-6
    torch.manual_seed(0)
    attn = Attention(D, n_heads, 0.0, True, n_kv_heads, qkv_bias=bias, bias=bias,
                     qk_norm=qk_norm, norm_eps=eps).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(randn(*p.shape, seed=p.numel()))
    cos, sin = rotary_tables(S, D // n_heads, theta)
    x = randn(2, S, D, seed=3).requires_grad_()
    y = attn(x, (cos, sin))
    x_ref = x.detach().clone().requires_grad_()
    y_ref = torch.stack([naive_attention(attn, x_ref[b], theta, eps) for b in range(2)])
    assert (y - y_ref).abs().max() < TOL
    target = randn(2, S, D, seed=4)
    (y * target).sum().backward()
    (y_ref * target).sum().backward()
    assert (x.grad - x_ref.grad).abs().max() < TOL


def test_rotary_tables_in_float64_match_angles():
    from dmoe.model.transformer import apply_rotary, rotary_tables

    cos, sin = rotary_tables(5, 8, 10000.0)
    x = randn(1, 1, 5, 8, seed=5)
    got = apply_rotary(x, cos, sin)[0, 0]
    assert (got - naive_rope(x[0, 0], 10000.0)).abs().max() < TOL


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_mlp_and_gated_shared_expert(activation):
    torch.manual_seed(0)
    mlp = MLP(6, 5, activation, bias=True).double()
    x = randn(4, 6, seed=6)
    h = x @ mlp.fc1.weight.t() + mlp.fc1.bias
    act = F.silu(h[:, :5]) * h[:, 5:] if activation == "swiglu" else F.gelu(h)
    ref = act @ mlp.fc2.weight.t() + mlp.fc2.bias
    assert (mlp(x) - ref).abs().max() < TOL
    shared = SharedExpert(6, 5, activation, gated=True, bias=True).double()
    shared.mlp.load_state_dict(mlp.state_dict())
    gate = torch.sigmoid(x @ shared.gate.weight.t())
    assert (shared(x) - gate * ref).abs().max() < TOL


def _cfg(*extra):
    return load_config(None, ["--model.vocab_size=32", "--model.d_model=16", "--model.n_heads=4",
                              "--model.seq_len=8", "--model.ffn_dim=24", "--moe.num_experts=4",
                              "--moe.expert_ffn_dim=8", *extra])


def test_first_dense_layers_and_every():
    cfg = _cfg("--model.n_layers=5", "--moe.every=1", "--moe.first_dense_layers=2")
    assert [is_moe_block(cfg, i) for i in range(5)] == [False, False, True, True, True]
    cfg = _cfg("--model.n_layers=6", "--moe.every=2", "--moe.first_dense_layers=2")
    assert [is_moe_block(cfg, i) for i in range(6)] == [False, False, False, True, False, True]
    model = MoETransformer(cfg)
    assert [type(b.ffn).__name__ for b in model.blocks] == ["MLP", "MLP", "MLP", "MoELayer", "MLP", "MoELayer"]


def test_block_adds_the_shared_expert_to_the_routed_output():
    cfg = _cfg("--model.n_layers=1", "--moe.every=1", "--moe.num_shared_experts=2",
               "--moe.shared_expert_ffn_dim=3", "--moe.shared_expert_gate=true", "--model.norm=rmsnorm")
    torch.manual_seed(0)
    model = MoETransformer(cfg).double()
    block = model.blocks[0]
    for m in block.modules():
        if hasattr(m, "compute_dtype"):
            m.compute_dtype = torch.float64
    assert block.shared_expert.mlp.fc2.in_features == 6  # 2 shared experts x 3
    x = randn(2, 8, 16, seed=7)
    out, _ = block(x, (model.rope_cos, model.rope_sin))
    a = x + block.attn(block.ln1(x), (model.rope_cos, model.rope_sin))
    h = naive_rms(a, block.ln2.weight, cfg.model.norm_eps)
    routed, _ = block.ffn(h)
    shared = torch.sigmoid(h @ block.shared_expert.gate.weight.t()) * block.shared_expert.mlp(h)
    assert (out - (a + routed + shared)).abs().max() < TOL


@pytest.mark.parametrize("overrides,message", [
    (["--model.n_kv_heads=3"], "model.n_kv_heads (3) must divide model.n_heads (4)"),
    (["--model.n_kv_heads=2", "--parallel.tp=4"],
     "model.n_kv_heads (2) must be divisible by parallel.tp (4): TP splits grouped-query attention by whole key/value heads"),
    (["--moe.num_shared_experts=-1"], "moe.num_shared_experts (-1) must be >= 0"),
    (["--moe.first_dense_layers=-2"], "moe.first_dense_layers (-2) must be >= 0"),
    (["--model.norm_eps=0"], "model.norm_eps (0.0) must be in (0, 1)"),
    (["--model.norm=batchnorm"], "model.norm ('batchnorm') must be one of ['layernorm', 'rmsnorm']"),
])
def test_bad_model_options_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        _cfg(*overrides)
    assert str(err.value) == message
