"""The router computes in fp32 even under bf16 autocast: autocast used to recast its gate
matmul to bf16, which changed ~0.5% of tokens' top-2 sets on CPU."""
import torch

from dmoe.moe.router import TopKRouter


def test_bf16_autocast_routing_equals_fp32_routing():
    torch.manual_seed(0)
    router = TopKRouter(64, 16, 2)
    x = torch.randn(4096, 64)
    plain = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = router(x)
    assert torch.equal(plain.expert_idx_TK, auto.expert_idx_TK)
    assert auto.gate_TK.dtype == torch.float32
    assert torch.equal(plain.gate_TK, auto.gate_TK)


def test_bf16_matmul_would_have_changed_routing():
    """The check above can fail: a bf16 gate matmul really moves top-2 choices here."""
    torch.manual_seed(0)
    router = TopKRouter(64, 16, 2)
    x = torch.randn(4096, 64)
    logits_bf16 = (x.bfloat16() @ router.gate.weight.bfloat16().t()).float()
    top_bf16 = torch.softmax(logits_bf16, -1).topk(2, -1).indices.sort(-1).values
    assert not torch.equal(top_bf16, router(x).expert_idx_TK.sort(-1).values)
