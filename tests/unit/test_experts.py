import pytest
import torch

from dmoe.moe import experts as ex
from dmoe.moe.experts import GroupedExperts

COUNTS = [3, 0, 5, 1]  # an expert with no rows: its gradient slice must be zero


def run(impl, activation, dtype="float32"):
    torch.manual_seed(0)
    experts = GroupedExperts(len(COUNTS), 8, 16, activation, dtype, impl=impl)
    x = torch.randn(sum(COUNTS), 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = experts(x, COUNTS)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
    return y, x.grad, experts.w1.grad, experts.w2.grad


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("impl", ["loop", "torch_grouped_mm"])
def test_fused_matches_grouped(activation, impl):
    for a, b in zip(run("fused", activation), run(impl, activation)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _, _, gw1, gw2 = run("fused", activation)
    assert gw1[1].abs().sum() == 0 and gw2[1].abs().sum() == 0


def test_bfloat16_compute_keeps_fp32_master_weights():
    y, gx, gw1, gw2 = run("fused", "swiglu", "bfloat16")
    assert y.dtype == gx.dtype == gw1.dtype == gw2.dtype == torch.float32
    ref = run("fused", "swiglu")
    torch.testing.assert_close(y, ref[0], rtol=5e-2, atol=5e-2)


def test_bad_impl_names_field():
    with pytest.raises(ValueError, match="moe.experts_impl"):
        GroupedExperts(2, 4, 8, impl="cuda")


def test_auto_resolves_to_a_formulation_that_runs():
    experts = GroupedExperts(4, 8, 16)
    assert experts.resolve_impl(torch.zeros(4 * 64, 8), [64] * 4) in ex.IMPLS[1:]
    assert experts.resolve_impl(torch.zeros(0, 8), [0] * 4) == "fused"  # _grouped_mm refuses empty
    experts.compute_dtype = torch.float64  # tests run experts in fp64; _grouped_mm has no fp64
    assert experts.resolve_impl(torch.zeros(4, 8, dtype=torch.float64), [1] * 4) != "torch_grouped_mm"


@pytest.mark.parametrize("impl", ["fused", "loop", "torch_grouped_mm", "auto"])
def test_expanded_incoming_gradient(impl):
    """y.sum().backward() hands the experts an expanded dL/dy (strides [0, 0]);
    torch._grouped_mm's backward refused it ("Invalid strides/sizes")."""
    torch.manual_seed(0)
    experts = GroupedExperts(len(COUNTS), 8, 16, impl=impl)
    x = torch.randn(sum(COUNTS), 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    experts(x, COUNTS).sum().backward()
    got = x.grad, experts.w1.grad, experts.w2.grad
    x.grad = experts.w1.grad = experts.w2.grad = None
    y = experts(x, COUNTS)
    y.backward(torch.ones(y.shape))  # the same gradient, contiguous
    for a, b in zip(got, (x.grad, experts.w1.grad, experts.w2.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_grouped_mm_takes_an_expanded_gradient():
    x = torch.randn(sum(COUNTS), 8, requires_grad=True)
    w = torch.randn(len(COUNTS), 8, 16, requires_grad=True)
    ex.torch_grouped_mm(x, w, COUNTS).sum().backward()  # raised "Invalid strides/sizes"
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ex.grouped_mm(x_ref, w_ref, COUNTS).backward(torch.ones(sum(COUNTS), 16))
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-6, atol=1e-6)
