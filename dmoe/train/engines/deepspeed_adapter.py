"""Hand dmoe's process groups to DeepSpeed so its engine reduces each parameter where dmoe does.

DeepSpeed keeps expert groups in dicts of `deepspeed.utils.groups`, keyed by a group name
that each expert parameter carries (`param.group_name = "ep_size_<ep>"`, `allreduce=False`),
and finds the dense data-parallel and tensor-parallel groups through an `mpu` object.
We fill both from our own `ProcessGroups` instead of letting DeepSpeed build a second,
differently ordered set. This is the one place that touches DeepSpeed's globals.

What ZeRO 1/2 then does with each gradient (deepspeed 0.19, stage_1_and_2.py), and why it
matches dmoe.parallel.grads:
    dense    divided by dp, summed over the mpu's dp group               = mean over dp
    expert   divided by dp (the dense dp size), summed over the edp group = sum over edp / dp
    router   under TP each TP rank saw a token slice: `sum_tp_partial_grads` sums it over
             TP as autograd produces it, before DeepSpeed's post-accumulate hooks reduce it
    norm     each rank's partition, summed over dp then over TP; a partition is counted on
             TP rank 0 only unless `is_model_parallel_parameter(p)`. `tag_model_parallel`
             marks TP shards and, under TP, expert params (their ZeRO partitions are over
             edp, which spans TP, so each TP rank holds a different slice).
DeepSpeed turns the expert path on (`has_moe_layers`) only when the model contains its own
`deepspeed.moe.layer.MoE`; `initialize` turns it on for dmoe's tagged expert params.
"""
from __future__ import annotations

from unittest import mock

import torch
import torch.distributed as dist
from torch import nn

from dmoe.parallel import param_roles
from dmoe.parallel.layout import ProcessGroups
from dmoe.startup.deepspeed_shm import release_own_buffer


def register_expert_groups(groups: ProcessGroups) -> None:
    from deepspeed.utils import groups as ds_groups

    ep = groups.size("ep")
    if ep <= 1:
        return
    name = param_roles.expert_group_name(ep)
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = groups.ranks["ep"]
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.edp
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = groups.ranks["edp"]


class DeepSpeedMPU:
    """The Megatron-style `mpu` interface DeepSpeed queries for TP and DP groups."""

    def __init__(self, groups: ProcessGroups):
        self.groups = groups

    def get_data_parallel_group(self):
        return self.groups.dp

    def get_data_parallel_world_size(self):
        return self.groups.size("dp")

    def get_data_parallel_rank(self):
        return self.groups.index("dp")

    def get_data_parallel_group_ranks(self):
        return self.groups.ranks["dp"]

    def get_tensor_model_parallel_group(self):
        return self.groups.tp

    def get_tensor_model_parallel_world_size(self):
        return self.groups.size("tp")

    def get_tensor_model_parallel_rank(self):
        return self.groups.index("tp")

    def get_tensor_model_parallel_src_rank(self):
        return self.groups.ranks["tp"][0]

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0

    @staticmethod
    def world_rank():
        return dist.get_rank()


def tag_model_parallel(model: nn.Module, groups: ProcessGroups) -> None:
    """Mark the params whose ZeRO partition differs across TP ranks (see the module doc)."""
    if groups.size("tp") == 1:
        return
    for p in model.parameters():
        if param_roles.is_tp_sharded(p) or param_roles.is_expert(p):
            param_roles.mark_model_parallel(p)


def sum_tp_partial_grads(model: nn.Module, groups: ProcessGroups) -> list:
    """Tensor hooks summing each tp_partial grad over TP; returns their handles.

    A tensor hook runs before the grad is accumulated, so before DeepSpeed's
    post-accumulate hooks that reduce it over DP (ZeRO 2: every micro-batch; ZeRO 1: at the
    accumulation boundary). Every TP rank runs the same graph, so the all-reduces line up.
    Communication: one all-reduce over TP per partial param per backward.
    """
    if groups.size("tp") == 1:
        return []

    def hook(grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=groups.tp)
        return grad

    return [p.register_hook(hook) for p in model.parameters()
            if p.requires_grad and param_roles.is_tp_partial(p)]


def initialize(model: nn.Module, groups: ProcessGroups, param_groups: list[dict], config: dict
               ) -> tuple:
    """`deepspeed.initialize` with dmoe's groups and expert handling on -> (engine, optimizer).

    DeepSpeed sets `has_moe_layers` in `_configure_distributed_model`, before it builds the
    ZeRO optimizer, and `deepspeed.initialize` constructs the engine by its module-level name
    `DeepSpeedEngine`: so a subclass that also counts dmoe's expert params is swapped in
    under that name for the duration of the call, and the result is checked afterwards.
    """
    import deepspeed
    from deepspeed.moe.utils import is_moe_param

    register_expert_groups(groups)
    has_experts = any(is_moe_param(p) for p in model.parameters())
    for g in param_groups:  # ZeRO looks the expert-DP group up by the param group's name
        if g.get("moe"):
            g["name"] = g["params"][0].group_name

    class ExpertParamsEngine(deepspeed.DeepSpeedEngine):
        def _configure_distributed_model(self, module):
            super()._configure_distributed_model(module)
            self.has_moe_layers = self.has_moe_layers or has_experts

    with mock.patch.object(deepspeed, "DeepSpeedEngine", ExpertParamsEngine):
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups, config=config, mpu=DeepSpeedMPU(groups),
            dist_init_required=False,
        )
    # DeepSpeed's CPU shm all-reduce buffer (one per rank, never unlinked): off /dev/shm now
    release_own_buffer(groups.rank, dist.group.WORLD)
    if has_experts and not getattr(optimizer, "has_moe_layers", True):
        raise RuntimeError(f"deepspeed {deepspeed.__version__} did not take dmoe's expert groups "
                           "(optimizer.has_moe_layers is False): expert grads would mix shards")
    return engine, optimizer
