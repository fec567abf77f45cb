"""Text continuation on one process: greedy (temperature 0, deterministic) or sampled.

    new_ids = generate(model, prompt_ids, max_new_tokens=32, temperature=0.8, top_k=40, seed=1)

Each step reruns the whole window (the last model.seq_len tokens): no KV cache, so it is
simple and exact rather than fast; a check of a model before and after conversion.
"""
from __future__ import annotations

import torch

from .transformer import MoETransformer


@torch.no_grad()
def generate(model: MoETransformer, prompt_ids: list[int], max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0,
             stop_ids: tuple[int, ...] = ()) -> list[int]:
    """The new ids (a stop id ends it and is kept, as transformers' generate does)."""
    if not prompt_ids:
        raise ValueError("generate: the prompt has no tokens")
    ids, window = list(prompt_ids), model.cfg.model.seq_len
    rng = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for _ in range(max_new_tokens):
        x_BS = torch.tensor([ids[-window:]], device=device)
        logits_V = model(x_BS).logits[0, -1].float()
        if temperature <= 0:
            nxt = int(logits_V.argmax())
        else:
            logits_V = logits_V / temperature
            if 0 < top_k < logits_V.numel():
                kth = logits_V.topk(top_k).values[-1]
                logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits_V, -1).cpu(), 1, generator=rng))
        ids.append(nxt)
        if nxt in stop_ids:
            break
    return ids[len(prompt_ids):]
