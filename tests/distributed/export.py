"""Test-side reader of `dmoe checkpoint export` files into an unsharded model."""
from __future__ import annotations

import torch
from safetensors.torch import load_file


def load_exported(model: torch.nn.Module, path: str) -> None:
    """Fill an unsharded model from an export; tied weights (lm_head = tok_emb) follow."""
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    names = {n for n, _ in model.named_parameters()}
    really_missing = [k for k in missing if k in names]
    assert not really_missing and not unexpected, (really_missing[:4], unexpected[:4])
