"""Dense checkpoints into an MoE: sparse upcycling (Komatsuzaki et al., 2022) and
Branch-Train-MiX (Sukhbaatar et al., 2024). Pure tensor maps on whole parameters.

    cfg = moe_config(dense_cfg, num_experts=8, top_k=2, every=1)
    tensors = upcycle(dense_tensors, cfg, noise=0.0, seed=0)     # E copies of each MLP
    tensors = merge([tensors_1, ..., tensors_N], cfg)           # MLP n -> expert n (BTX)

Layouts (dmoe.moe.experts, dmoe.hf.weights): the dense MLP's fc1 is nn.Linear [H, D] with
[gate; up] rows (H = 2F for SwiGLU, F for GELU) and fc2 [D, F]; the stacked experts are
the transposes, w1_EDH[e] = fc1.T ([gate | up] along H) and w2_EFD[e] = fc2.T. So an
expert computes exactly the MLP it came from when the activation matches and the width
is the dense ffn_dim (and there are no biases: experts have none).

What holds: with every expert a copy, a token's output is sum_k gate_k * MLP(x); the
gates sum to 1 when moe.normalize_topk and top_k > 1 (route_scale 1), so the upcycled
model computes the dense model's output up to rounding, whatever the router says, as
long as nothing is dropped (moe.capacity_factor null). With top_k = 1 the gate is the
router probability (< 1): the output is p * MLP(x), not the dense output. The new router
is drawn as the model's own init (normal, std 0.02), seeded.
"""
from __future__ import annotations

import re
import tempfile

import torch
import yaml

from dmoe.config import Config, ConfigError, load_config
from dmoe.model.transformer import is_moe_block

MLP_WEIGHT = re.compile(r"^blocks\.(\d+)\.ffn\.fc([12])\.(weight|bias)$")


def moe_config(dense: Config, num_experts: int, top_k: int, every: int = 1,
               overrides: list[str] = ()) -> Config:
    """dense's config with its MLPs (every `every`-th block) as experts of their shape;
    dotted `overrides` (e.g. ["--moe.capacity_factor=null"]) applied last."""
    tree = dense.to_dict()
    m = tree["model"]
    tree["parallel"].update(tp=1, ep=1)
    tree["moe"].update(num_experts=num_experts, top_k=top_k, every=every,
                       expert_ffn_dim=m["ffn_dim"], activation=m["mlp_activation"],
                       first_dense_layers=0, num_shared_experts=0, normalize_topk=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(tree, f, sort_keys=False)
        f.flush()
        cfg = load_config(f.name, list(overrides))
    m, e = cfg.model, cfg.moe
    if e.expert_ffn_dim != m.ffn_dim or e.activation != m.mlp_activation:
        raise ConfigError(f"moe.expert_ffn_dim ({e.expert_ffn_dim}) and moe.activation "
                          f"({e.activation}) must equal model.ffn_dim ({m.ffn_dim}) and "
                          f"model.mlp_activation ({m.mlp_activation}): experts are the MLPs")
    if e.num_shared_experts:
        raise ConfigError("moe.num_shared_experts must be 0: there is no shared expert to copy")
    if m.bias:
        raise ConfigError("model.bias is true: the dense MLPs have biases, experts have none")
    if not any(is_moe_block(cfg, i) for i in range(m.n_layers)):
        raise ConfigError(f"no block becomes MoE (moe.every {e.every}, moe.first_dense_layers "
                          f"{e.first_dense_layers}, model.n_layers {m.n_layers})")
    return cfg


def _new_router(cfg: Config, g: torch.Generator) -> torch.Tensor:
    return torch.randn(cfg.moe.num_experts, cfg.model.d_model, generator=g,
                       dtype=torch.float64).mul_(0.02).to(torch.float32)


def _mlp_of(tensors: dict, block: int, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    names = [f"blocks.{block}.ffn.fc{j}.weight" for j in (1, 2)]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ConfigError(f"{source}: has no {missing[0]} (block {block} is not a dense MLP block)")
    return tensors[names[0]], tensors[names[1]]


def _moe_blocks(cfg: Config) -> list[int]:
    return [i for i in range(cfg.model.n_layers) if is_moe_block(cfg, i)]


def upcycle(dense: dict[str, torch.Tensor], cfg: Config, noise: float = 0.0, seed: int = 0,
            source: str = "dense checkpoint") -> dict[str, torch.Tensor]:
    """Every MoE block of cfg gets E copies of the dense MLP of that block (plus, if
    noise > 0, Gaussian noise of std noise * std(weight), drawn per expert) and a new
    router; everything else is kept."""
    g = torch.Generator().manual_seed(seed)
    blocks = set(_moe_blocks(cfg))
    out = {n: t for n, t in dense.items()
           if not ((m := MLP_WEIGHT.match(n)) and int(m.group(1)) in blocks)}
    for i in sorted(blocks):
        fc1_HD, fc2_DF = _mlp_of(dense, i, source)
        experts = []
        for w in (fc1_HD.T, fc2_DF.T):
            stacked = w.unsqueeze(0).repeat(cfg.moe.num_experts, 1, 1)
            if noise > 0:
                scale = noise * float(w.double().std())
                stacked = stacked + scale * torch.randn(stacked.shape, generator=g,
                                                        dtype=torch.float64).to(stacked.dtype)
            experts.append(stacked.contiguous())
        out[f"blocks.{i}.ffn.experts.w1"], out[f"blocks.{i}.ffn.experts.w2"] = experts
        out[f"blocks.{i}.ffn.router.gate.weight"] = _new_router(cfg, g)
    return out


def merge(models: list[dict[str, torch.Tensor]], cfg: Config, seed: int = 0,
          sources: list[str] | None = None) -> dict[str, torch.Tensor]:
    """BTX: model n's MLP of each MoE block becomes expert n; every other parameter is the
    mean over the models (in float64); each MoE block gets a new router."""
    n = len(models)
    if cfg.moe.num_experts != n:
        raise ConfigError(f"moe.num_experts ({cfg.moe.num_experts}) must equal the number of "
                          f"merged models ({n})")
    sources = sources or [f"model {i}" for i in range(n)]
    names = set(models[0])
    for src, tensors in zip(sources[1:], models[1:]):
        odd = sorted(names ^ set(tensors))
        if odd:
            raise ConfigError(f"{src}: parameter {odd[0]} is in one model but not the other")
    g = torch.Generator().manual_seed(seed)
    blocks = set(_moe_blocks(cfg))
    out = {}
    for name in sorted(names):
        m = MLP_WEIGHT.match(name)
        if m and int(m.group(1)) in blocks:
            continue
        out[name] = torch.stack([t[name].double() for t in models]).mean(0).to(models[0][name].dtype)
    for i in sorted(blocks):
        mlps = [_mlp_of(t, i, src) for t, src in zip(models, sources)]
        out[f"blocks.{i}.ffn.experts.w1"] = torch.stack([fc1.T for fc1, _ in mlps]).contiguous()
        out[f"blocks.{i}.ffn.experts.w2"] = torch.stack([fc2.T for _, fc2 in mlps]).contiguous()
        out[f"blocks.{i}.ffn.router.gate.weight"] = _new_router(cfg, g)
    return out
