import math

import pytest
import torch

from dmoe.moe.dispatcher import CapacitySettings
from dmoe.moe.layer import MoELayer
from tests.reference_moe import reference_moe

T, D, F_, E = 24, 8, 16, 4


def make_layer(k, cf, policy, activation="gelu", seed=0, min_capacity=0, eval_cf="same",
               normalize_topk=True):
    torch.manual_seed(seed)
    cap = CapacitySettings(cf, cf if eval_cf == "same" else eval_cf, min_capacity, policy)
    layer = MoELayer(D, E, k, F_, cap, activation=activation, normalize_topk=normalize_topk).double()
    layer.experts.compute_dtype = torch.float64  # everything float64: compare at 1e-12
    # a skewed gate so that capacity actually bites
    with torch.no_grad():
        layer.router.gate.weight[0] += 0.8
    return layer


def grads(module, x):
    return [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("policy", ["position", "probability"])
@pytest.mark.parametrize("cf", [0.5, 1.0, 2.0, None])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_matches_naive_reference(k, policy, cf, activation):
    layer = make_layer(k, cf, policy, activation)
    x = torch.randn(T, D, dtype=torch.double, generator=torch.Generator().manual_seed(1))
    target = torch.randn(T, D, dtype=torch.double)

    x1 = x.clone().requires_grad_()
    y, stats = layer(x1.view(2, T // 2, D))
    (y.reshape(T, D) * target).sum().backward()
    g1 = grads(layer, x1)
    layer.zero_grad()

    x2 = x.clone().requires_grad_()
    y_ref, kept, dropped = reference_moe(layer, x2, cf, policy)
    (y_ref * target).sum().backward()
    g2 = grads(layer, x2)

    torch.testing.assert_close(y.reshape(T, D), y_ref, rtol=0, atol=1e-12)
    assert int(stats.dropped) == dropped
    assert stats.kept_E.tolist() == kept_per_expert(layer, x, kept)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    if cf is None:
        assert dropped == 0
    if cf == 0.5:
        assert dropped > 0  # the skewed gate must make this case drop


def kept_per_expert(layer, x_TD, kept) -> list[int]:
    """The reference's kept (token, choice) pairs counted per expert."""
    idx = layer.router(x_TD).expert_idx_TK
    counts = [0] * layer.router.num_experts
    for t, k in kept:
        counts[int(idx[t, k])] += 1
    return counts


@pytest.mark.parametrize("min_capacity,eval_cf,normalize", [(5, "same", True), (0, 2.0, True),
                                                              (0, "same", False), (3, 0.5, False)])
def test_min_capacity_eval_factor_and_unnormalised_gates(min_capacity, eval_cf, normalize):
    """min_capacity raises a small capacity; eval mode uses the eval factor; k=2 gates left
    unnormalised are the raw probabilities."""
    layer = make_layer(2, 0.5, "position", min_capacity=min_capacity, eval_cf=eval_cf,
                       normalize_topk=normalize)
    x = torch.randn(T, D, dtype=torch.double, generator=torch.Generator().manual_seed(3))
    for training in (True, False):
        layer.train(training)
        cf = 0.5 if training or eval_cf == "same" else eval_cf
        y, stats = layer(x.view(1, T, D))
        y_ref, kept, dropped = reference_moe(layer, x, cf, "position", min_capacity)
        torch.testing.assert_close(y.reshape(T, D), y_ref, rtol=0, atol=1e-12)
        assert int(stats.dropped) == dropped
        assert stats.kept_E.tolist() == kept_per_expert(layer, x, kept)
        assert stats.capacity == max(-(-2 * T * cf // E), min_capacity)


def test_aux_and_z_loss_hand_computed_skewed():
    """Switch loss E * sum_e f_e P_e and z-loss on a skewed case worked by hand (the
    uniform case gives 1 for any f, so it cannot catch a wrong f)."""
    from dmoe.moe.router import load_balance_loss, router_z_loss

    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]], dtype=torch.float64)
    idx = torch.tensor([[0, 1], [0, 2]])  # f = [2/4, 1/4, 1/4]; P = [0.65, 0.25, 0.1]
    expected = 3 * (0.5 * 0.65 + 0.25 * 0.25 + 0.25 * 0.1)
    assert float(load_balance_loss(probs, idx)) == pytest.approx(expected, abs=1e-15)
    logits = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    lse = [math.log(math.e + math.e**2), math.log(2.0)]
    assert float(router_z_loss(logits)) == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, abs=1e-14)


def test_drop_counts_hand_computed():
    # 6 tokens, 2 experts, k=1, cf=1.0 -> capacity ceil(1*6/2*1.0) = 3.
    # Gate sends tokens 0..4 to expert 0 and token 5 to expert 1: expert 0 keeps tokens
    # 0, 1, 2 (first come) and drops 3, 4 -> 2 dropped, 1/3 of assignments.
    cap = CapacitySettings(1.0, 1.0, 0, "position")
    layer = MoELayer(2, 2, 1, 4, cap).double()
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    x = torch.tensor([[1.0, 0]] * 5 + [[-1.0, 0]], dtype=torch.double)
    y, stats = layer(x)
    assert stats.capacity == 3
    assert stats.routed_E.tolist() == [5, 1]
    assert stats.kept_E.tolist() == [3, 1]
    assert int(stats.dropped) == 2
    assert float(stats.drop_fraction) == pytest.approx(2 / 6)
    assert torch.all(y[3:5] == 0) and torch.all(y[:3].abs().sum(-1) > 0)


def test_aux_loss_is_one_under_uniform_routing():
    from dmoe.moe.router import load_balance_loss

    probs = torch.full((8, 4), 0.25)
    idx = torch.arange(8).remainder(4).unsqueeze(1)
    assert float(load_balance_loss(probs, idx)) == pytest.approx(1.0)
