"""A naive MoE written for clarity, not speed: the reference dmoe's layer must match.

Per token, per choice, in plain Python; capacity decided by explicit counting.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_moe(layer, x_TD, capacity_factor, policy="position", min_capacity=0):
    """Returns (y_TD, kept set of (t, k) pairs, dropped count) using `layer`'s weights, in
    x's dtype throughout (the router too)."""
    num_tokens = x_TD.shape[0]
    router, experts = layer.router, layer.experts
    num_experts, top_k = router.num_experts, router.top_k
    choices = []  # per token: list of (expert, prob, gate)
    for t in range(num_tokens):
        logits = x_TD[t] @ router.gate.weight.to(x_TD.dtype).t()
        probs = torch.softmax(logits, -1)
        top = sorted(range(num_experts), key=lambda e: (-probs[e].item(), e))[:top_k]
        total = sum(probs[e] for e in top)
        gates = [probs[e] / total if (top_k > 1 and router.normalize_topk) else probs[e] for e in top]
        choices.append([(e, probs[e].item(), g) for e, g in zip(top, gates)])

    if capacity_factor is None or capacity_factor <= 0:
        kept = {(t, k) for t in range(num_tokens) for k in range(top_k)}
    else:
        capacity = max(math.ceil(top_k * num_tokens / num_experts * capacity_factor), min_capacity)
        kept = set()
        for e in range(num_experts):
            # priority: choice k first, then token position; or router probability
            cands = [(k, t) for k in range(top_k) for t in range(num_tokens) if choices[t][k][0] == e]
            if policy == "probability":
                cands.sort(key=lambda kt: -choices[kt[1]][kt[0]][1])
            for k, t in cands[:capacity]:
                kept.add((t, k))

    rows = []
    for t in range(num_tokens):
        acc = torch.zeros_like(x_TD[t])
        for k, (e, _, gate) in enumerate(choices[t]):
            if (t, k) not in kept:
                continue
            h = x_TD[t] @ experts.w1[e]
            if experts.activation == "swiglu":
                a, b = h.chunk(2)
                h = F.silu(a) * b
            else:
                h = F.gelu(h)
            acc = acc + gate * (h @ experts.w2[e])
        rows.append(acc)
    dropped = num_tokens * top_k - len(kept)
    return torch.stack(rows), kept, dropped
