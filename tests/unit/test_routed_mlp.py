"""The fused gather -> experts -> combine path (LocalDispatcher.dispatch_combine,
GroupedExperts.forward with token_idx_N, routed_mlp.py) against the naive per-token reference in
fp64 at 1e-12, and bit for bit against the unfused dispatch / experts / combine."""
import pytest
import torch

from dmoe.moe import routed_mlp
from dmoe.moe.dispatcher import CapacitySettings, LocalDispatcher
from dmoe.moe.gather_mm import gather_mm
from dmoe.moe.layer import MoELayer
from tests.reference_moe import reference_moe

T, D, F_, E = 32, 8, 16, 8


def make_layer(k, cf, impl, activation="gelu", dtype=torch.float64, recompute=False):
    torch.manual_seed(0)
    layer = MoELayer(D, E, k, F_, CapacitySettings(cf, cf, 0, "position"), activation=activation,
                     experts_impl=impl, recompute_experts=recompute).to(dtype)
    layer.experts.compute_dtype = dtype
    with torch.no_grad():
        layer.router.gate.weight[0] += 0.8  # skewed, so that the capacity drops rows
    return layer


def step(layer, x, target, forward):
    x = x.clone().requires_grad_()
    y = forward(layer, x)
    (y * target).sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    return y.detach(), grads


def unfused(layer, x_TD):
    """dispatch -> experts -> combine, as before the fused path (and as EP runs it)."""
    routing = layer.router(x_TD, None)
    x_ND, meta = layer.dispatcher.dispatch(x_TD, routing, layer.training)
    return layer.dispatcher.combine(layer.experts(x_ND, meta.counts), meta)


def inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(T, D, dtype=dtype, generator=gen), torch.randn(T, D, dtype=dtype, generator=gen)


@pytest.mark.parametrize("k", [1, 2, 6])
@pytest.mark.parametrize("cf", [1.0, None])
@pytest.mark.parametrize("impl", ["fused", "loop"])
def test_routed_path_matches_naive_reference(k, cf, impl, monkeypatch):
    calls = []
    real = routed_mlp._RoutedExpertMLP.apply
    monkeypatch.setattr(routed_mlp._RoutedExpertMLP, "apply",
                        lambda *a: calls.append(1) or real(*a))
    layer = make_layer(k, cf, impl)
    x, target = inputs()
    y, g1 = step(layer, x, target, lambda lay, x_: lay(x_)[0])
    y_ref, g2 = step(layer, x, target, lambda lay, x_: reference_moe(lay, x_, cf)[0])
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    assert len(g1) == 4  # x, router gate, w1, w2
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert len(calls) == (impl == "fused")  # the fused node ran exactly when asked for
    if cf is not None and k > 1:
        assert reference_moe(layer, x, cf)[2] > 0  # the capacity really dropped rows


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("cf", [1.0, None])
@pytest.mark.parametrize("impl", ["fused", "loop", "torch_grouped_mm"])
def test_routed_is_bit_identical_to_unfused_fp32(activation, cf, impl):
    """fused: routed_mlp.py; loop / torch_grouped_mm: gather_mm.py + act_mm.py."""
    layer = make_layer(2, cf, impl, activation, torch.float32)
    x, target = inputs(torch.float32)
    y1, g1 = step(layer, x, target, lambda lay, x_: lay(x_)[0])
    y2, g2 = step(layer, x, target, unfused)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["fused", "loop"])
def test_recompute_through_routed_path_matches_reference(impl):
    layer = make_layer(2, 1.0, impl, recompute=True)
    x, target = inputs()
    y, g1 = step(layer, x, target, lambda lay, x_: lay(x_)[0])
    y_ref, g2 = step(layer, x, target, lambda lay, x_: reference_moe(lay, x_, 1.0)[0])
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_layer_takes_dispatch_combine_when_offered(monkeypatch):
    def refuse(*args):
        raise AssertionError("dispatch() called although dispatch_combine is offered")

    monkeypatch.setattr(LocalDispatcher, "dispatch", refuse)
    layer = make_layer(2, None, "fused")
    y, stats = layer(inputs()[0])
    assert y.shape == (T, D) and int(stats.dropped) == 0


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_node_matches_naive_row_loop_with_an_empty_expert(activation):
    """routed_expert_mlp alone: repeated tokens, an expert with no rows (its weight gradient
    must be zero), every input's gradient, against a per-row loop under autograd."""
    gen = torch.Generator().manual_seed(3)
    counts = [3, 0, 5, 1]
    width = 2 * F_ if activation == "swiglu" else F_
    leaves = [torch.randn(T, D, dtype=torch.float64, generator=gen),
              torch.rand(sum(counts), dtype=torch.float64, generator=gen),
              torch.randn(len(counts), D, width, dtype=torch.float64, generator=gen),
              torch.randn(len(counts), F_, D, dtype=torch.float64, generator=gen)]
    token_idx_N = torch.tensor([5, 5, 0, 7, 5, 1, 2, 0, 7])  # token 5 three times
    target = torch.randn(T, D, dtype=torch.float64, generator=gen)

    def run(fn):
        args = [t.clone().requires_grad_() for t in leaves]
        out = fn(*args)
        (out * target).sum().backward()
        return out.detach(), [a.grad for a in args]

    def naive(x, gate, w1, w2):
        expert_of_row = [e for e, n in enumerate(counts) for _ in range(n)]
        out = torch.zeros(T, D, dtype=torch.float64)
        for r, (t, e) in enumerate(zip(token_idx_N.tolist(), expert_of_row)):
            h = x[t] @ w1[e]
            if activation == "swiglu":
                a = torch.nn.functional.silu(h[:F_]) * h[F_:]
            else:
                a = torch.nn.functional.gelu(h)
            out = out.index_add(0, torch.tensor([t]), (gate[r] * (a @ w2[e]))[None])
        return out

    y, g1 = run(lambda x, gate, w1, w2: routed_mlp.routed_expert_mlp(
        x, token_idx_N, gate, w1, w2, counts, activation))
    y_ref, g2 = run(naive)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert g1[2][1].abs().sum() == 0 and g1[3][1].abs().sum() == 0
    assert g1[0][3].abs().sum() == 0  # a token no row reads gets no gradient


def test_gather_mm_keeps_x_not_the_gathered_rows():
    """What the routed first matmul saves for backward: x_TD, w1 and the row indices."""
    x_TD = torch.randn(T, D, requires_grad=True)
    w = torch.randn(2, D, F_, requires_grad=True)
    idx = torch.tensor([3, 1, 3, 0, 7, 7, 2])  # k copies of a token (3, 7) in one expert too
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        h = gather_mm(x_TD, w, idx, [4, 3], False)
    assert [tuple(t.shape) for t in packed] == [(T, D), (2, D, F_), (7,)]
    h.sum().backward()
    x_ref, w_ref = x_TD.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    x_ND = x_ref[idx]
    torch.cat([x_ND[:4] @ w_ref[0], x_ND[4:] @ w_ref[1]]).sum().backward()
    torch.testing.assert_close(x_TD.grad, x_ref.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=0, atol=1e-6)
