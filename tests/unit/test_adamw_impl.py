"""The torch engine's AdamW (dmoe.train.engines.torch_engine.adamw): fused on CPU, and the
same arithmetic as a hand-written AdamW (fp64, 3 steps, weight decay, 1e-14)."""
import torch

from dmoe.train.engines.torch_engine import adamw


def naive_adamw(params, grads_per_step, lr, betas, eps, wd):
    """Decoupled weight decay, bias-corrected moments (Loshchilov & Hutter)."""
    b1, b2 = betas
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(params, grads)):
            p.mul_(1 - lr * wd)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    return params


def test_engine_adamw_is_fused_on_cpu_and_matches_naive():
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(4, 3, dtype=torch.double, generator=gen),
             torch.randn(5, dtype=torch.double, generator=gen)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    params = [p.clone().requires_grad_() for p in start]
    opt = adamw([{"params": params, "weight_decay": 0.1}], lr=0.01)
    assert opt.defaults["fused"] is True and opt.defaults["betas"] == (0.9, 0.95)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    expected = naive_adamw(start, grads, 0.01, (0.9, 0.95), 1e-8, 0.1)
    for p, e in zip(params, expected):
        assert (p.detach() - e).abs().max() < 1e-14
    assert max((p.detach() - s).abs().max() for p, s in zip(params, start)) > 1e-3  # moved
