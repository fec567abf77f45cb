"""`dmoe train --dry-run`: check the config and the rank layout for a world size, print what
the run would hold (parameters, FLOPs per token, memory per rank) and exit 0 without
starting a process group. Errors are the one line a real start would give (exit 2).

    dmoe train --dry-run --config default --world-size 8 --parallel.ep=2
"""
from __future__ import annotations

import os
import sys

from dmoe.config import Config, ConfigError, load_config, validate_paths


def _si(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n:.4g} "


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def default_world_size() -> int:
    """WORLD_SIZE from the environment (a launcher's), else 1."""
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def _engine(cfg: Config, under_deepspeed: bool) -> tuple[str, str]:
    if cfg.train.engine != "auto":
        return cfg.train.engine, ""
    return ("deepspeed" if under_deepspeed else "torch",
            " (train.engine=auto: deepspeed under the deepspeed launcher, else torch)")


def report(cfg: Config, world_size: int, config_name: str, under_deepspeed: bool = False) -> str:
    """The dry run's text; raises ConfigError / ValueError as a real start would."""
    from dmoe.model.flops import count_params, train_flops_per_token, vocab_size
    from dmoe.model.memory import estimate_memory
    from dmoe.model.transformer import is_moe_block
    from dmoe.parallel.layout import ParallelLayout

    validate_paths(cfg)
    layout = ParallelLayout(world_size, tp=cfg.parallel.tp, ep=cfg.parallel.ep)
    layout.validate(cfg.moe.num_experts)
    engine, why = _engine(cfg, under_deepspeed)
    if engine == "deepspeed":
        from dmoe.train.engines import check_deepspeed

        check_deepspeed(cfg)
    m, e, t = cfg.model, cfg.moe, cfg.train
    if t.precision == "auto":  # as the run would resolve it on this machine
        from dmoe.startup.precision import choose_precision, device_facts

        t.precision = choose_precision("auto", device_facts())[0]
    counts, flops = count_params(cfg), train_flops_per_token(cfg)
    tokens = t.micro_batch_size * m.seq_len * t.grad_accum * layout.dp
    mem = estimate_memory(cfg, layout, engine)
    n_moe = sum(is_moe_block(cfg, i) for i in range(m.n_layers))
    zero = f" ZeRO {t.zero_stage}" if engine == "deepspeed" else ""
    capacity = "dropless" if not e.capacity_factor else f"capacity factor {e.capacity_factor}"
    lines = [
        (f"config       {config_name}, world size {world_size}, engine {engine}{zero}{why}, "
        f"precision {t.precision}"),
        f"layout       {layout.describe().splitlines()[0]}",
        (f"model        {m.n_layers} blocks ({n_moe} MoE), d_model {m.d_model}, {e.num_experts} experts "
        f"top-{e.top_k} ({capacity}), seq_len {m.seq_len}, vocab {vocab_size(cfg)}"),
        (f"parameters   total {_si(counts.total)}, expert {_si(counts.expert)}, dense {_si(counts.dense)} "
        f"(embedding {_si(counts.embedding)}), active per token {_si(counts.active_per_token)}"),
        (f"FLOPs        {_si(flops)}FLOP per trained token (forward + backward); {_si(flops * tokens)}FLOP "
        f"per step of {tokens} tokens"),
        (f"memory/rank  params {_mib(mem.params)} ({_si(mem.dense_params)} dense + "
        f"{_si(mem.expert_params)} expert), grads {_mib(mem.grads)}, AdamW state "
        f"{_mib(mem.optimizer)}, activations {_mib(mem.activations)} (micro batch "
        f"{t.micro_batch_size} x {m.seq_len}); total {_mib(mem.total)} (estimate)"),
        f"run dir      {os.path.abspath(t.run_dir)}",
        f"data dir     {os.path.abspath(cfg.data.data_dir)}",
        "ok           config and layout are valid; nothing was started",
    ]
    return "\n".join(lines)


def main(config: str, overrides: list[str], world_size: int | None = None,
         under_deepspeed: bool = False) -> int:
    try:
        cfg = load_config(config, overrides)
        text = report(cfg, world_size or default_world_size(), config, under_deepspeed)
    except (ConfigError, ValueError) as err:
        sys.stderr.write(f"config error: {err}\n")
        return 2
    sys.stdout.write(text + "\n")
    return 0
