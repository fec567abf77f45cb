"""Predicted drops (pure replay of recorded routing) against the real layer and model."""
import torch

from dmoe.config import load_config
from dmoe.model.transformer import MoETransformer
from dmoe.moe.capacity import expert_capacity, plan_capacity
from dmoe.moe.capacity_replay import drop_fractions, kept_rows, offrank_rows, smallest_factor
from dmoe.moe.layer import MoELayer

FACTORS = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, None]


def test_kept_rows_match_plan_capacity():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        T, E, k = 37, 6, 2
        idx_TK = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
        idx_N = idx_TK.t().reshape(-1)
        routed = torch.bincount(idx_N, minlength=E).view(1, 1, E)
        for f in FACTORS:
            cap = expert_capacity(T, E, k, f, 3)
            plan = plan_capacity(idx_N, torch.rand(T * k, generator=gen), E, cap, "probability")
            assert torch.equal(kept_rows(routed, k, f, 3)[0, 0], plan.counts_E)


def test_drop_fractions_and_recommendation():
    routed = torch.tensor([[[6, 2, 2, 2]], [[3, 3, 3, 3]]])  # 2 forwards of 6 tokens, k=2, E=4
    per_layer, overall = drop_fractions(routed, 2, [1.0, 2.0])
    # capacity 3 at factor 1: first forward drops 3 of 12, second none
    assert per_layer[0, 0].item() == 3 / 24 and overall[1].item() == 0.0
    assert smallest_factor([1.0, 2.0], overall, 0.01) == 2.0
    assert smallest_factor([1.0], overall, 0.01) is None
    off = offrank_rows(routed, torch.tensor([0, 1]), ep=2)
    assert off.tolist() == [[4], [6]]


def test_prediction_equals_observed_drop_in_the_model():
    """Eval-mode routing recorded dropless, replayed at each factor, equals running there.

    One MoE layer: its input does not depend on capacity, so the routing is the same. The
    observed drop counts the rows the experts were actually given (a hook on the experts),
    not the layer's own kept counts, which come from the same capacity formula."""
    cfg = load_config(None, ["--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2",
                             "--model.seq_len=16", "--moe.num_experts=4", "--moe.every=2",
                             "--moe.eval_capacity_factor=0"])
    cfg.model.vocab_size = 64
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        model.blocks[1].ffn.router.gate.weight[0] += 0.3  # imbalanced, so factors matter
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        routed = model(x).moe_stats[0].routed_E.view(1, 1, -1)
    predicted = drop_fractions(routed, cfg.moe.top_k, FACTORS, cfg.moe.min_capacity)[1]
    layer: MoELayer = model.blocks[1].ffn
    received = []
    layer.experts.register_forward_pre_hook(lambda _, args: received.append(sum(args[1])))
    for f, pred in zip(FACTORS, predicted.tolist()):
        layer.dispatcher.capacity = type(layer.dispatcher.capacity)(f, f, cfg.moe.min_capacity, "position")
        with torch.no_grad():
            stats = model(x).moe_stats[0]
        assert torch.equal(stats.routed_E, routed[0, 0])
        observed = 1 - received[-1] / int(routed.sum())
        assert abs(observed - pred) < 1e-12, f
    assert predicted[0] > 0.05 and predicted[-1] == 0
