"""TopKRouter options against a naive per-token reference, in float64 at 1e-12.

Shape legend: T tokens, D model dim, E experts, K top-k, S tokens per sequence.
"""
import math

import pytest
import torch

from dmoe.config import ConfigError, load_config
from dmoe.moe.dispatcher import CapacitySettings
from dmoe.moe.layer import MoELayer
from dmoe.moe.router import TopKRouter, select_experts, sequence_balance_loss

T, D, E, S = 12, 6, 8, 4
TOL = dict(rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- naive reference
def ref_choice(choice, k, num_groups, topk_groups):
    """Experts of one token: its best groups by the sum of their two best choice values."""
    allowed = range(len(choice))
    if topk_groups < num_groups:
        n = len(choice) // num_groups
        group_score = [sum(sorted(choice[g * n:(g + 1) * n], reverse=True)[:2])
                       for g in range(num_groups)]
        best = sorted(range(num_groups), key=lambda g: (-group_score[g], g))[:topk_groups]
        allowed = [e for g in best for e in range(g * n, (g + 1) * n)]
    return sorted(allowed, key=lambda e: (-choice[e], e))[:k]


def reference_router(weight, x, k, score_func="softmax", normalize=True, scale=1.0,
                     num_groups=1, topk_groups=1, seq_len=None, bias=None):
    """Per token, per expert in plain Python: ([{expert: (gate, score)}], aux, z, seq_aux)."""
    num_tokens, num_experts = x.shape[0], weight.shape[0]
    choices, norms, z_terms = [], [], []
    for t in range(num_tokens):
        logits = [torch.dot(x[t], weight[e]) for e in range(num_experts)]
        top_logit = max(v.item() for v in logits)
        exps = [torch.exp(v - top_logit) for v in logits]
        z_terms.append((top_logit + torch.log(sum(exps))) ** 2)
        if score_func == "softmax":
            scores = [v / sum(exps) for v in exps]
            norm = scores
        else:
            scores = [1 / (1 + torch.exp(-v)) for v in logits]
            norm = [s / sum(scores) for s in scores]
        choice = [scores[e].item() + (0.0 if bias is None else bias[e]) for e in range(num_experts)]
        top = ref_choice(choice, k, num_groups, topk_groups)
        total = sum(scores[e] for e in top)
        choices.append({e: ((scores[e] / total if k > 1 and normalize else scores[e]) * scale,
                            scores[e]) for e in top})
        norms.append(norm)

    def balance(tokens, factor):
        counts = [sum(e in choices[t] for t in tokens) for e in range(num_experts)]
        return sum(factor * counts[e] * sum(norms[t][e] for t in tokens) / len(tokens)
                   for e in range(num_experts))

    aux = balance(range(num_tokens), num_experts / (num_tokens * k))
    seq_len = seq_len or num_tokens
    seqs = [range(b, b + seq_len) for b in range(0, num_tokens, seq_len)]
    seq_aux = sum(balance(seq, num_experts / (k * seq_len)) for seq in seqs) / len(seqs)
    return choices, aux, sum(z_terms) / num_tokens, seq_aux


# ---------------------------------------------------------------- helpers
def make_router(k, score_func="softmax", normalize=True, scale=1.0, groups=(1, 1), seed=0):
    torch.manual_seed(seed)
    router = TopKRouter(D, E, k, 0.0, normalize, score_func, scale, *groups).double()
    with torch.no_grad():
        router.gate.weight.normal_(0.0, 0.7)
    return router


def inputs(seed=1, num_tokens=T):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, D, dtype=torch.float64, generator=g)


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)


# ---------------------------------------------------------------- options x reference
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("groups", [(1, 1), (4, 2), (2, 1), (8, 4)])  # (8, 4): one per group
@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_router_matches_naive_reference(score_func, normalize, scale, groups, k):
    router = make_router(k, score_func, normalize, scale, groups)
    weight = router.gate.weight
    x = inputs().requires_grad_()
    out = router(x, S)
    ref_choices, ref_aux, ref_z, ref_seq = reference_router(
        weight, x, k, score_func, normalize, scale, *groups, seq_len=S)

    w_TE = torch.randn(T, E, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    gate_obj = (w_TE.gather(1, out.expert_idx_TK) * out.gate_TK).sum()
    ref_gate_obj = sum(w_TE[t, e] * g for t, c in enumerate(ref_choices) for e, (g, _) in c.items())
    for t in range(T):
        experts = out.expert_idx_TK[t].tolist()
        assert set(experts) == set(ref_choices[t]), t
        ref_gate = torch.stack([ref_choices[t][e][0] for e in experts])
        ref_score = torch.stack([ref_choices[t][e][1] for e in experts])
        torch.testing.assert_close(out.gate_TK[t], ref_gate, **TOL)
        torch.testing.assert_close(out.score_TK[t], ref_score.detach(), **TOL)
    assert not out.score_TK.requires_grad
    pairs = {"gates": (gate_obj, ref_gate_obj), "aux": (out.aux_loss, ref_aux),
             "z": (out.z_loss, ref_z), "seq_aux": (out.seq_aux_loss, ref_seq)}
    for name, (got, want) in pairs.items():
        torch.testing.assert_close(got, want, **TOL, msg=name)
        for g_got, g_want in zip(grads(got, (weight, x)), grads(want, (weight, x))):
            torch.testing.assert_close(g_got, g_want, **TOL, msg=f"{name} grad")


def test_sequence_split_changes_only_seq_aux_loss():
    router, x = make_router(2, "sigmoid"), inputs()
    whole, split = router(x), router(x, S)
    ref_whole = reference_router(router.gate.weight, x, 2, "sigmoid")[3]
    torch.testing.assert_close(whole.seq_aux_loss, ref_whole, **TOL)
    torch.testing.assert_close(whole.aux_loss, split.aux_loss, rtol=0, atol=0)
    assert not torch.allclose(whole.seq_aux_loss, split.seq_aux_loss)
    with pytest.raises(ValueError, match=r"router tokens \(12\) must be a multiple of seq_len \(5\)"):
        router(x, 5)


def test_zero_tokens_give_zero_losses():
    out = make_router(2, "sigmoid")(inputs(num_tokens=0), S)
    assert out.expert_idx_TK.shape == (0, 2)
    assert out.aux_loss.item() == out.seq_aux_loss.item() == out.z_loss.item() == 0.0


def test_moe_layer_passes_sequence_length():
    """A [B, S, D] input balances per sequence; a 2-D one (a TP slice) as one sequence."""
    layer = MoELayer(D, E, 2, 10, CapacitySettings(None, None, 0, "position"),
                     score_func="sigmoid", route_scale=2.0, num_groups=4, topk_groups=2).double()
    x = inputs()
    _, stats_3d = layer(x.view(T // S, S, D))
    _, stats_2d = layer(x)
    torch.testing.assert_close(stats_3d.seq_aux_loss, layer.router(x, S).seq_aux_loss, **TOL)
    torch.testing.assert_close(stats_2d.seq_aux_loss, layer.router(x).seq_aux_loss, **TOL)
    assert layer.router.route_scale == 2.0 and layer.router.topk_groups == 2


# ---------------------------------------------------------------- hand-computed cases
def test_sequence_balance_loss_hand_computed():
    # E=2, K=1, two sequences of S=2. Seq 0: both tokens to expert 0, probs .75/.25:
    # f = 2/(1*2) * [2, 0] = [2, 0], P = [.75, .25] -> 1.5. Seq 1: one token each,
    # f = [1, 1], P = mean([.5, .5], [.25, .75]) = [.375, .625] -> 1.0. Mean: 1.25.
    # As one sequence of 4: f = 2/4 * [3, 1], P = [.5625, .4375] -> .84375 + .21875.
    probs = torch.tensor([[.75, .25], [.75, .25], [.5, .5], [.25, .75]], dtype=torch.float64)
    idx = torch.tensor([[0], [0], [0], [1]])
    assert sequence_balance_loss(probs, idx, 2).item() == pytest.approx(1.25, abs=1e-15)
    assert sequence_balance_loss(probs, idx, None).item() == pytest.approx(1.0625, abs=1e-15)


def test_group_selection_hand_computed():
    # 4 experts in 2 groups {0, 1}, {2, 3}; one group per token, k=2.
    # Token 0: group sums .9 vs .95 -> {2, 3}, though expert 0 scores highest.
    # Token 1: .9 vs .75 -> {0, 1}.
    scores = torch.tensor([[.9, .0, .5, .45], [.1, .8, .7, .05]], dtype=torch.float64)
    chosen = [set(row) for row in select_experts(scores, 2, 2, 1).tolist()]
    assert chosen == [{2, 3}, {0, 1}]
    assert [set(row) for row in select_experts(scores, 2).tolist()] == [{0, 2}, {1, 2}]
    # A bias moves the choice (group scores included): token 0's group 1 drops to .45.
    bias = torch.tensor([0.0, 0.0, -0.5, 0.0], dtype=torch.float64)
    assert set(select_experts(scores, 2, 2, 1, bias)[0].tolist()) == {0, 1}


@pytest.mark.parametrize("groups", [(1, 1), (4, 2), (8, 4)])
def test_choice_bias_matches_reference_and_leaves_gates_unbiased(groups):
    scores = torch.rand(T, E, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(E, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 0.3
    idx = select_experts(scores, 3, *groups, choice_bias_E=bias)
    for t in range(T):
        choice = [scores[t, e].item() + bias[e].item() for e in range(E)]
        assert set(idx[t].tolist()) == set(ref_choice(choice, 3, *groups))
    assert not torch.equal(idx, select_experts(scores, 3, *groups))  # the bias mattered


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_experts_lie_within_topk_groups(score_func):
    router = TopKRouter(D, 16, 4, score_func=score_func, num_groups=4, topk_groups=2).double()
    idx = router(inputs(num_tokens=300)).expert_idx_TK
    groups_per_token = [len({e // 4 for e in row}) for row in idx.tolist()]
    assert max(groups_per_token) <= 2
    assert len(set(idx.flatten().tolist())) > 8  # not trivially stuck in two groups


# ---------------------------------------------------------------- config and model wiring
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--moe.num_groups=3"], "moe.num_experts (8) must be divisible by moe.num_groups (3)"),
        (["--moe.num_groups=0"], "moe.num_groups (0) must be >= 1"),
        (["--moe.num_groups=2", "--moe.topk_groups=3"],
         "moe.topk_groups (3) must be in [1, moe.num_groups (2)]"),
        (["--moe.topk_groups=0"], "moe.topk_groups (0) must be in [1, moe.num_groups (1)]"),
        (["--moe.num_groups=4", "--moe.top_k=3"],
         "moe.top_k (3) must be <= moe.topk_groups (1) * moe.num_experts (8) / moe.num_groups (4) = 2"),
        (["--moe.score_func=tanh"], "moe.score_func ('tanh') must be one of ['softmax', 'sigmoid']"),
        (["--moe.route_scale=0"], "moe.route_scale (0.0) must be > 0"),
        (["--moe.seq_aux_loss_coef=-1"], "moe.seq_aux_loss_coef (-1.0) must be >= 0"),
    ],
)
def test_bad_routing_config_fails_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_router_rejects_bad_groups_without_config():
    with pytest.raises(ValueError, match=r"moe.topk_groups \(3\) must be in \[1, moe.num_groups \(2\)\]"):
        TopKRouter(D, 4, 2, num_groups=2, topk_groups=3)


def test_config_defaults_keep_todays_router():
    e = load_config(None, []).moe
    assert (e.score_func, e.route_scale, e.seq_aux_loss_coef, e.num_groups, e.topk_groups) == \
        ("softmax", 1.0, 0.0, 1, 1)


def test_model_adds_weighted_seq_aux_loss():
    from dmoe.model.transformer import MoETransformer

    base = ["--model.vocab_size=32", "--model.d_model=16", "--model.n_layers=2",
            "--model.n_heads=2", "--model.seq_len=8", "--model.ffn_dim=32", "--moe.num_experts=4",
            "--moe.expert_ffn_dim=16", "--moe.score_func=sigmoid", "--moe.num_groups=2",
            "--moe.topk_groups=1", "--moe.capacity_factor=null"]
    idx = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(5))
    outs = []
    for coef in (0.0, 0.5):
        torch.manual_seed(0)
        model = MoETransformer(load_config(None, base + [f"--moe.seq_aux_loss_coef={coef}"]))
        outs.append(model(idx, idx))
    router = next(m for m in model.modules() if isinstance(m, TopKRouter))
    assert (router.score_func, router.num_groups, router.topk_groups) == ("sigmoid", 2, 1)
    seq_aux = outs[1].seq_aux_loss
    assert math.isfinite(seq_aux.item()) and seq_aux.item() > 0
    torch.testing.assert_close(outs[1].loss - outs[0].loss, 0.5 * seq_aux, rtol=1e-5, atol=1e-6)
