"""One parameter's training state (value + AdamW exp_avg/exp_avg_sq/step) out of and into
each engine, as whole tensors of the parameter's shape, for dmoe.checkpoint.

Plain torch (and DeepSpeed ZeRO 0 in fp32, whose optimizer is the same torch AdamW over the
module's params): `optimizer.state[param]`, no communication.

DeepSpeed ZeRO 1/2: the fp32 masters and Adam moments live in flat partitions, one per
param group and DP rank (`single_partition_of_fp32_groups`); a parameter may straddle
ranks. DeepSpeed's tensor-fragment API reads and writes them per parameter:
    get (safe_get_full_fp32_param / safe_get_full_optimizer_state): every rank puts its
        fragment into a zero buffer, then one all-reduce over the param's ZeRO group (DP,
        or expert-DP for experts). A collective: every rank must ask for every parameter,
        in the same order, even ranks that write nothing.
    set (safe_set_*): each rank copies its own fragment out of the whole tensor; local.
The Adam step is one scalar per flat partition, read and set on the inner torch optimizer.
The moments exist only after the first optimizer step (DeepSpeed links them lazily), so a
load into a fresh engine creates them first. The module weights are then set to the
masters cast to their dtype: what ZeRO's post-step copy (`update_lp_params`) would write.
"""
from __future__ import annotations

import torch

from .errors import CheckpointError

MOMENTS = ("exp_avg", "exp_avg_sq")
OPTIM_STATES = (*MOMENTS, "step")


# ---------------------------------------------------------------- torch optimizers
def holds(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> bool:
    """Whether a torch optimizer updates this exact tensor (not a flat copy of it)."""
    return any(p is param for g in getattr(optimizer, "param_groups", []) for p in g["params"])


def torch_states(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> dict:
    state = optimizer.state.get(param, {})
    return {"param": param.detach(), **{k: state[k] for k in OPTIM_STATES if k in state}}


@torch.no_grad()
def set_torch_states(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter,
                     states: dict) -> None:
    param.copy_(states["param"])
    if all(k in states for k in OPTIM_STATES):
        optimizer.state[param] = {k: v.to(param.device if k != "step" else "cpu")
                                  for k, v in states.items() if k != "param"}


# ---------------------------------------------------------------- DeepSpeed ZeRO 1/2
def is_zero_partitioned(param: torch.nn.Parameter) -> bool:
    """ZeRO 1/2 (and DeepSpeed's bf16 optimizer) link every trained param to its fragment."""
    return hasattr(param, "_hp_mapping")


def _flat_states(zero_opt) -> list[dict]:
    """The inner torch optimizer's state of each flat fp32 partition (empty before step 1)."""
    inner = zero_opt.optimizer
    return [inner.state.get(g["params"][0], {}) for g in inner.param_groups]


def zero_step(zero_opt) -> torch.Tensor | None:
    """The Adam step (the same in every partition: they all step together), None before 1."""
    steps = [s["step"] for s in _flat_states(zero_opt) if "step" in s]
    if not steps:
        return None
    values = sorted({float(s) for s in steps})
    if len(values) != 1:
        raise CheckpointError(f"DeepSpeed param groups disagree on the Adam step: {values}")
    return steps[0].detach().clone()


def zero_states(zero_opt, param: torch.nn.Parameter) -> dict:
    """Collective over the param's ZeRO group (see the module doc): whole fp32 tensors."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {"param": safe_get_full_fp32_param(param)}
    step = zero_step(zero_opt)
    if step is not None:
        _link_moments(zero_opt)
        out.update({k: safe_get_full_optimizer_state(param, k) for k in MOMENTS}, step=step)
    return out


def _link_moments(zero_opt) -> None:
    """Point every param's fragment at its slice of the moments (idempotent).

    DeepSpeed 0.19 links them once, right after the first group's first step, when the other
    param groups have no state yet: their fragments then stay without moments and
    `safe_get_full_optimizer_state` fails. dmoe has up to 4 groups, so link them all here."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    lp_groups = getattr(zero_opt, "bit16_groups", None)
    flats = getattr(zero_opt, "single_partition_of_fp32_groups", None)
    if lp_groups is None or flats is None:
        raise CheckpointError(f"{type(zero_opt).__name__}: no ZeRO 1/2 flat partitions "
                              "(bit16_groups); checkpoints support DeepSpeed ZeRO 1/2, "
                              "or ZeRO 0 in fp32")
    for lp, flat in zip(lp_groups, flats):
        if zero_opt.optimizer.state.get(flat):
            lazy_init_hp_params_optimizer_state(lp, flat, zero_opt.optimizer.state)


def _ensure_flat_states(zero_opt, step: torch.Tensor) -> None:
    """Adam state for every flat partition (zeros if new), at `step`, linked to the params."""
    inner = zero_opt.optimizer
    for group in inner.param_groups:
        flat = group["params"][0]
        state = inner.state[flat]
        if not state:
            state.update(exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
        state["step"] = step.detach().clone().cpu()
    _link_moments(zero_opt)


@torch.no_grad()
def set_zero_states(zero_opt, param: torch.nn.Parameter, states: dict) -> None:
    """Local (no communication): this rank's fragments, then the module weight itself."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    master = states["param"].to(torch.float32)
    safe_set_full_fp32_param(param, master)
    param.copy_(master)  # ZeRO's module weights are the masters cast to their dtype
    if all(k in states for k in OPTIM_STATES):
        _ensure_flat_states(zero_opt, states["step"])
        for k in MOMENTS:
            safe_set_full_optimizer_state(param, states[k].to(torch.float32), k)
