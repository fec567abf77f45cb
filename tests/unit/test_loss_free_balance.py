"""Auxiliary-loss-free balancing (moe.bias_update_rate): the update rule on hand-computed
counts, and the router's bias moving the choice but never the gates."""
import torch

from dmoe.moe.router import TopKRouter, update_expert_bias


def test_update_rule_hand_computed():
    bias = torch.tensor([0.5, 0.0, -0.25, 0.0], dtype=torch.float64)
    # mean load 5: expert 0 over-loaded, 1 under, 2 at the mean, 3 under
    update_expert_bias(bias, torch.tensor([9, 3, 5, 3]), rate=0.125)
    assert bias.tolist() == [0.375, 0.125, -0.25, 0.125]


def test_bias_moves_choice_not_gates():
    torch.manual_seed(0)
    router = TopKRouter(6, 4, 2, score_func="sigmoid", bias_update_rate=0.1).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    assert router.expert_bias is not None and not router.expert_bias.requires_grad
    assert "expert_bias" in dict(router.named_parameters())  # so checkpoints carry it
    plain = router(x)
    with torch.no_grad():
        router.expert_bias[3] = 10.0  # expert 3 becomes every token's pick
    biased = router(x)
    assert bool((biased.expert_idx_TK == 3).any(-1).all())
    scores = torch.sigmoid(x @ router.gate.weight.t())
    chosen = scores.gather(1, biased.expert_idx_TK)
    # gates: the unbiased scores of the chosen experts, renormalised
    assert (biased.gate_TK - chosen / chosen.sum(-1, keepdim=True)).abs().max() < 1e-12
    assert not torch.equal(plain.expert_idx_TK, biased.expert_idx_TK)


def test_no_bias_parameter_when_off():
    router = TopKRouter(6, 4, 2)
    assert router.expert_bias is None and "expert_bias" not in dict(router.named_parameters())
