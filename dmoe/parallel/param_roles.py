"""Parameter roles: which reduction and which norm a parameter's gradient needs.

The roles are marks on the parameter tensors themselves, the convention DeepSpeed and
Megatron use (DeepSpeed reads `allreduce`, `group_name` and `tensor_model_parallel` off
the tensor). This module is the only one that writes or reads them:

    role         set by                       meaning
    expert       expert_parallel.apply        one EP rank's experts: grads summed over edp
                                              then / dp (dmoe.parallel.grads); DeepSpeed sees
                                              allreduce=False, group_name="ep_size_<ep>"
    tp_sharded   tensor_parallel.apply        a TP shard: its squared norm is summed over TP
    tp_partial   tensor_parallel.apply        each TP rank saw only its token slice (the MoE
                                              router; experts without EP): grads are summed
                                              over TP before the DP reduction. Expert shards
                                              are never tp_partial: their edp group already
                                              spans the TP ranks (dmoe.parallel.layout).
    model_parallel (DeepSpeed only)           the param's ZeRO partition differs across TP
                                              ranks (see train/engines/deepspeed_adapter.py)
"""
from __future__ import annotations

from torch import nn

_EXPERT, _TP_SHARDED, _TP_PARTIAL = "dmoe_expert", "dmoe_tp_sharded", "dmoe_tp_partial"


def expert_group_name(ep: int) -> str:
    """DeepSpeed's name for the expert groups of degree `ep` (as deepspeed.moe.layer.MoE)."""
    return f"ep_size_{ep}"


def mark_expert(param: nn.Parameter, ep: int) -> None:
    setattr(param, _EXPERT, True)
    param.allreduce = False  # DeepSpeed: an MoE param (deepspeed.moe.utils.is_moe_param)
    param.group_name = expert_group_name(ep)  # DeepSpeed: its expert group
    setattr(param, _TP_PARTIAL, False)


def mark_tp_sharded(param: nn.Parameter) -> None:
    setattr(param, _TP_SHARDED, True)


def mark_tp_partial(param: nn.Parameter) -> None:
    """Summed over TP before DP, unless it is an expert shard (see the module doc)."""
    setattr(param, _TP_PARTIAL, not is_expert(param))


def mark_model_parallel(param: nn.Parameter) -> None:
    param.tensor_model_parallel = True  # DeepSpeed's name (is_model_parallel_parameter)


def is_expert(param: nn.Parameter) -> bool:
    return getattr(param, _EXPERT, False)


def is_tp_sharded(param: nn.Parameter) -> bool:
    return getattr(param, _TP_SHARDED, False)


def is_tp_partial(param: nn.Parameter) -> bool:
    return getattr(param, _TP_PARTIAL, False)
