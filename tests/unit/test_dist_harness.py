import pytest
import torch
import torch.distributed as dist

from tests._dist import RankFailed, run_ranks


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t


def _fail_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on purpose")
    return rank


def test_harness_runs_collectives():
    out = run_ranks(_sum_ranks, 3)
    assert [float(t) for t in out] == [3.0, 3.0, 3.0]


def test_harness_reports_failing_rank():
    with pytest.raises(RankFailed, match="(?s)rank 1 failed.*boom on purpose"):
        run_ranks(_fail_on_one, 2, timeout=30)
