"""train.activation_checkpointing (block | experts) gives the loss and gradients of none."""
import pytest
import torch

from dmoe.config import load_config
from dmoe.model.transformer import MoETransformer


def _loss_and_grads(mode: str, dropout: float):
    cfg = load_config(None, [
        "--model.vocab_size=32", "--model.d_model=16", "--model.n_heads=4", "--model.seq_len=8",
        "--model.n_layers=2", "--model.ffn_dim=24", "--moe.num_experts=4", "--moe.every=1",
        "--moe.expert_ffn_dim=8", "--moe.capacity_factor=1.0", f"--model.dropout={dropout}",
        "--moe.router_jitter=0.1", f"--train.activation_checkpointing={mode}",
    ])
    torch.manual_seed(0)
    model = MoETransformer(cfg).double()
    for m in model.modules():
        if hasattr(m, "compute_dtype"):
            m.compute_dtype = torch.float64
    if mode == "experts":
        assert all(b.ffn.experts.recompute for b in model.blocks)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 32, (2, 8), generator=g), torch.randint(0, 32, (2, 8), generator=g)
    torch.manual_seed(5)  # dropout and router jitter draw from the RNG: recompute restores it
    out = model(x, y)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["block", "experts"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_recompute_matches_no_recompute(mode, dropout):
    loss_ref, grads_ref = _loss_and_grads("none", dropout)
    loss, grads = _loss_and_grads(mode, dropout)
    assert torch.equal(loss, loss_ref)
    worst = max(float((grads[n] - grads_ref[n]).abs().max()) for n in grads_ref)
    assert worst < 1e-12, worst
