"""train.precision=auto: what the run computes in, chosen once at start from the device.

    precision, why = choose_precision("auto", DeviceFacts(cuda=True, bf16=True, name="H100"))
    cfg.train.precision, why = resolve_precision(cfg.train.precision)   # facts from torch

On CUDA, auto is bf16 autocast when the GPU supports bf16 (compute capability 8.0+), else
fp32 with TF32 matmuls (no effect before Ampere); on the CPU auto is fp32 (bf16 matmuls
are slow there without BF16/AMX units). An explicit fp32 or bf16 is kept; explicit fp32 on
CUDA keeps exact fp32 matmuls (TF32 off). The caller logs the one line `why`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceFacts:
    cuda: bool
    bf16: bool = False  # the GPU computes bf16 (torch.cuda.is_bf16_supported)
    name: str = "CPU"


def device_facts() -> DeviceFacts:
    if not torch.cuda.is_available():
        return DeviceFacts(cuda=False)
    return DeviceFacts(
        cuda=True,
        bf16=torch.cuda.is_bf16_supported(including_emulation=False),
        name=torch.cuda.get_device_name(),
    )


def choose_precision(requested: str, facts: DeviceFacts) -> tuple[str, bool, str]:
    """(precision "fp32" | "bf16", TF32 matmuls on, the start-up line saying why)."""
    if requested == "bf16":
        return "bf16", False, "precision bf16 (train.precision=bf16): autocast, fp32 master weights"
    if requested == "fp32":
        tf32 = " (TF32 off: exact fp32 matmuls)" if facts.cuda else ""
        return "fp32", False, f"precision fp32 (train.precision=fp32){tf32}"
    if not facts.cuda:
        return "fp32", False, "precision fp32 (train.precision=auto on the CPU)"
    if facts.bf16:
        return (
            "bf16",
            False,
            f"precision bf16 (train.precision=auto: {facts.name} supports bf16): autocast",
        )
    return (
        "fp32",
        True,
        (f"precision fp32 with TF32 matmuls (train.precision=auto: {facts.name} has no bf16)"),
    )


def resolve_precision(requested: str, facts: DeviceFacts | None = None) -> tuple[str, str]:
    """choose_precision with this machine's facts; sets torch's TF32 switches to match
    (process-wide, before any model exists). Returns (precision, why)."""
    facts = facts or device_facts()
    precision, tf32, why = choose_precision(requested, facts)
    if facts.cuda:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return precision, why
