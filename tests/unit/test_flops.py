"""dmoe.model.flops against the built model (numel), a hand-computed case and torch's
FlopCounterMode on a forward + backward."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dmoe.config import load_config
from dmoe.model.flops import ParamCounts, count_params, forward_matmul_params, train_flops_per_token
from dmoe.model.transformer import MoETransformer

TINY = ["--model.d_model=16", "--model.n_layers=2", "--model.n_heads=2", "--model.seq_len=8",
        "--model.ffn_dim=24", "--model.vocab_size=32", "--moe.num_experts=4", "--moe.top_k=2",
        "--moe.every=2", "--moe.expert_ffn_dim=12"]


def _live_counts(cfg) -> tuple[int, int]:
    with torch.device("meta"):  # shapes only
        model = MoETransformer(cfg)
    total = sum(p.numel() for p in model.parameters())  # a tied head is one parameter
    expert = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("experts.w1", "experts.w2")))
    return total, expert


@pytest.mark.parametrize("preset,overrides", [
    ("default", []),
    ("mixtral-tiny", []),
    ("deepseek-tiny", []),  # shared experts, first dense layers, group routing, expert bias
    ("qwen3-moe-tiny", []),  # qk-norm, head_dim apart from d_model / n_heads
    ("qwen2-moe-tiny", ["--model.bias=true"]),  # gated shared expert, every bias
    ("default", ["--model.positions=learned", "--model.tie_embeddings=false", "--model.norm=rmsnorm"]),
])
def test_counts_match_the_built_model(preset, overrides):
    cfg = load_config(f"configs/{preset}.yaml", overrides)
    counts = count_params(cfg)
    total, expert = _live_counts(cfg)
    assert (counts.total, counts.expert, counts.dense) == (total, expert, total - expert)
    e = cfg.moe
    assert counts.active_per_token == counts.dense + counts.expert * e.top_k // e.num_experts


def test_hand_computed_tiny_case():
    cfg = load_config(None, TINY)
    # block 0 dense: qkv 16*48 + proj 16*16 = 1024, MLP 2*16*24 = 768, 2 LayerNorms 64
    # block 1 MoE: attention 1024, router 16*4 = 64, 4 experts of 2*16*12 = 384, norms 64
    # embedding 32*16 = 512 (tied head), final LayerNorm 32
    assert count_params(cfg) == ParamCounts(total=5088, expert=1536, dense=3552, embedding=512,
                                            active_per_token=3552 + 2 * 384)
    # per token: matmul weights 1024 + 768 + 1024 + 64 + 2*384 + head 512 = 4160 (x2 FLOPs),
    # attention scores + values 4 * L * H * R * S = 4 * 2 * 2 * 8 * 8 = 1024; training 3x
    assert forward_matmul_params(cfg) == 4160
    assert train_flops_per_token(cfg) == 3 * (2 * 4160 + 1024)
    assert train_flops_per_token(cfg, seq_len=4) == 3 * (2 * 4160 + 512)


@pytest.mark.parametrize("extra", [
    [],
    ["--model.n_kv_heads=1", "--moe.num_shared_experts=1", "--moe.shared_expert_gate=true",
     "--moe.first_dense_layers=1", "--moe.activation=swiglu", "--model.tie_embeddings=false",
     "--moe.every=1", "--model.n_layers=3"],
])
def test_matmul_flops_match_flop_counter(extra):
    """FlopCounterMode counts every aten.mm of a forward + backward of a dropless fp64 model
    (CPU attention is not counted by it: the attention term is checked by hand above)."""
    cfg = load_config(None, [*TINY, "--moe.capacity_factor=null", "--moe.experts_impl=loop", *extra])
    torch.manual_seed(0)
    model = MoETransformer(cfg).double()
    idx = torch.randint(0, 32, (2, 8))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx).loss.backward()
    counts = counter.get_flop_counts()["Global"]
    assert set(map(str, counts)) == {"aten.mm"}
    assert counter.get_total_flops() == 3 * 2 * forward_matmul_params(cfg) * idx.numel()
