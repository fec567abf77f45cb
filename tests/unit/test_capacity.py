import pytest
import torch

from dmoe.moe.capacity import expert_capacity, plan_capacity


def test_capacity_formula():
    assert expert_capacity(100, 8, 2, 1.25) == 32  # ceil(2*100/8*1.25) = ceil(31.25)
    assert expert_capacity(10, 8, 1, 1.0, min_capacity=4) == 4
    assert expert_capacity(100, 8, 2, None) is None
    assert expert_capacity(100, 8, 2, 0) is None


def test_position_policy_keeps_first_come():
    expert_idx = torch.tensor([0, 0, 1, 0, 1])
    score = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.2])
    plan = plan_capacity(expert_idx, score, 2, capacity=2, policy="position")
    assert plan.order_N.tolist() == [0, 1, 2, 4]
    assert plan.counts_E.tolist() == [2, 2] and plan.routed_E.tolist() == [3, 2]
    assert int(plan.num_dropped) == 1


def test_probability_policy_drops_lowest_score():
    expert_idx = torch.tensor([0, 0, 1, 0, 1])
    score = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.2])
    plan = plan_capacity(expert_idx, score, 2, capacity=2, policy="probability")
    assert plan.order_N.tolist() == [1, 3, 2, 4]


def test_dropless_keeps_everything_and_bad_policy_names_field():
    expert_idx = torch.tensor([1, 1, 1])
    plan = plan_capacity(expert_idx, torch.ones(3), 3, capacity=None)
    assert plan.counts_E.tolist() == [0, 3, 0] and int(plan.num_dropped) == 0
    with pytest.raises(ValueError, match="moe.drop_policy"):
        plan_capacity(expert_idx, torch.ones(3), 3, capacity=1, policy="random")
