"""Two engines behind one `Engine` protocol: plain torch (torchrun, srun, mpirun, python)
and DeepSpeed (under `deepspeed launch/train.py`: its optimizer, ZeRO 1/2, accumulation,
clipping).

    engine = build_engine("torch" | "deepspeed", model, cfg, groups)
    engine.forward(x, y) -> ModelOutput      engine.backward(loss)
    engine.step(lr) -> grad_norm | None      (call once per micro-batch; the optimizer
                                              steps at accumulation boundaries)

    torch_engine.py       AdamW + dmoe.parallel.grads
    deepspeed_engine.py   DeepSpeed's engine, config and the settings it refuses
    deepspeed_adapter.py  dmoe's groups and parameter roles handed to DeepSpeed
    param_groups.py       weight-decay / expert optimizer groups (both engines)
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from dmoe.config import Config
from dmoe.model.transformer import ModelOutput
from dmoe.parallel.layout import ProcessGroups

from .deepspeed_engine import DeepSpeedEngine, check_deepspeed, deepspeed_config
from .param_groups import param_groups
from .torch_engine import TorchEngine

ENGINE_NAMES = ("torch", "deepspeed")


class Engine(Protocol):
    """What the training step, checkpoints and tools need from an engine."""

    name: str
    module: nn.Module  # the (parallelized) MoETransformer
    nonfinite: str | None  # what was non-finite at the last accumulation boundary, else None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> ModelOutput: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, lr: float) -> float | None: ...

    def train(self, mode: bool = True) -> None: ...

    def param_states(self, param: nn.Parameter) -> dict: ...

    def load_param_states(self, param: nn.Parameter, states: dict) -> None: ...

    def resume_at(self, step: int) -> None: ...


def build_engine(engine_name: str, model: nn.Module, cfg: Config, groups: ProcessGroups) -> Engine:
    engine_cls = DeepSpeedEngine if engine_name == "deepspeed" else TorchEngine
    return engine_cls(model, cfg, groups)


__all__ = ["ENGINE_NAMES", "DeepSpeedEngine", "Engine", "TorchEngine", "build_engine",
           "check_deepspeed", "deepspeed_config", "param_groups"]
