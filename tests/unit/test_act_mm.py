"""act_mm (act(h) @ w2 per expert, keeping h only) against the two-node composition it
replaced (bit for bit, fp32) and a naive per-row loop (fp64, 1e-12); what it saves."""
import pytest
import torch

from dmoe.moe.act_mm import act_mm
from dmoe.moe.experts import grouped_mm, torch_grouped_mm
from dmoe.moe.mlp_math import act_forward

COUNTS = [3, 0, 5, 2]  # an expert without rows: its weight gradient must be exactly zero
D, F_ = 8, 16


def inputs(activation, dtype):
    gen = torch.Generator().manual_seed(0)
    width = 2 * F_ if activation == "swiglu" else F_
    h = torch.randn(sum(COUNTS), width, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(len(COUNTS), F_, D, generator=gen, dtype=dtype, requires_grad=True)
    g = torch.randn(sum(COUNTS), D, generator=gen, dtype=dtype)
    return h, w, g


def grads(fn, activation, dtype=torch.float32):
    h, w, g = inputs(activation, dtype)
    y = fn(h, w)
    y.backward(g)
    return y.detach(), h.grad, w.grad


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("grouped", [False, True])
def test_bit_identical_to_two_node_composition(activation, grouped):
    mm = torch_grouped_mm if grouped else grouped_mm
    old = grads(lambda h, w: mm(act_forward(h, activation), w, COUNTS), activation)
    new = grads(lambda h, w: act_mm(h, w, COUNTS, activation, grouped), activation)
    for a, b in zip(old, new):
        assert torch.equal(a, b)
    assert new[2][1].abs().sum() == 0


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_matches_naive_row_loop_fp64(activation):
    def naive(h, w):
        rows, e_of_row = [], [e for e, n in enumerate(COUNTS) for _ in range(n)]
        for r, e in enumerate(e_of_row):
            hr = h[r]
            a = (torch.nn.functional.gelu(hr) if activation == "gelu"
                 else torch.nn.functional.silu(hr[:F_]) * hr[F_:])
            rows.append(sum(a[f] * w[e, f] for f in range(F_)))
        return torch.stack(rows)

    ref = grads(naive, activation, torch.float64)
    got = grads(lambda h, w: act_mm(h, w, COUNTS, activation, False), activation, torch.float64)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grouped", [False, True])
def test_saves_h_not_the_activation_and_takes_expanded_grads(grouped):
    h, w, _ = inputs("gelu", torch.float32)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = act_mm(h, w, COUNTS, "gelu", grouped)
    assert [tuple(t.shape) for t in packed] == [tuple(h.shape), tuple(w.shape)]
    y.sum().backward()  # an expanded dL/dy (strides 0): the same as a contiguous ones
    got = h.grad, w.grad
    h.grad = w.grad = None
    act_mm(h, w, COUNTS, "gelu", grouped).backward(torch.ones(y.shape))
    assert torch.equal(got[0], h.grad) and torch.equal(got[1], w.grad)
