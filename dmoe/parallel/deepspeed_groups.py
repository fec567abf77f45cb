"""Hand dmoe's process groups to DeepSpeed so its engine reduces each parameter where dmoe does.

DeepSpeed keeps expert groups in dicts of `deepspeed.utils.groups`, keyed by a group name
that each expert parameter carries (`param.group_name = "ep_size_<ep>"`, `allreduce=False`),
and finds the dense data-parallel and tensor-parallel groups through an `mpu` object.
We fill both from our own `ProcessGroups` instead of letting DeepSpeed build a second,
differently ordered set. This is the one place that touches DeepSpeed's globals.
"""
from __future__ import annotations

import torch.distributed as dist


def expert_group_name(ep: int) -> str:
    return f"ep_size_{ep}"


def register_expert_groups(groups) -> None:
    from deepspeed.utils import groups as ds_groups

    ep = groups.size("ep")
    if ep <= 1:
        return
    name = expert_group_name(ep)
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = groups.ranks["ep"]
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.edp
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = groups.ranks["edp"]


class DeepSpeedMPU:
    """The Megatron-style `mpu` interface DeepSpeed queries for TP and DP groups."""

    def __init__(self, groups):
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
