"""A whole (unsharded) model on one process from a checkpoint: for generation and checks.

    model = model_from_checkpoint("runs/mixtral-tiny")   # eval mode, fp32

SRC is what dmoe.checkpoint.offline.open_checkpoint takes (a checkpoint, a run's
checkpoints/ dir or a run dir). The parallel layout in the saved config is replaced by
one rank; each parameter is assembled from its pieces. No process group.
"""
from __future__ import annotations

import torch

from dmoe.checkpoint.errors import CheckpointError
from dmoe.checkpoint.format import MANIFEST, CheckpointReader
from dmoe.checkpoint.offline import open_checkpoint
from dmoe.config import load_config

from .transformer import MoETransformer


def model_from_checkpoint(src: str, dtype: torch.dtype = torch.float32) -> MoETransformer:
    return load_model(open_checkpoint(src), dtype)


@torch.no_grad()
def load_model(reader: CheckpointReader, dtype: torch.dtype = torch.float32) -> MoETransformer:
    """The model of an opened (verified) checkpoint, in eval mode; float64 also makes the
    experts compute in float64."""
    cfg = load_config(reader.dir / "config.yaml", ["--parallel.tp=1", "--parallel.ep=1"])
    model = MoETransformer(cfg)
    params = dict(model.named_parameters())
    odd = sorted(set(params) ^ set(reader.tensors))
    if odd:
        raise CheckpointError(f"{reader.dir / MANIFEST}: {odd[0]} is in one of the checkpoint "
                              "and its config's model but not the other")
    for name, param in params.items():
        param.copy_(reader.global_tensor(name, "param"))
    model.to(dtype)
    if dtype == torch.float64:
        for module in model.modules():
            if hasattr(module, "compute_dtype"):
                module.compute_dtype = torch.float64
    return model.eval()
