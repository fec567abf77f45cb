import pytest
import torch.distributed as dist

from dmoe.parallel.layout import GROUP_KINDS, ParallelLayout, build_process_groups
from tests._dist import run_ranks


def test_world8_tp2_ep2_groups():
    layout = ParallelLayout(8, tp=2, ep=2)
    assert (layout.dp, layout.edp) == (4, 4)
    assert layout.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups("dp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout.groups("ep") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups("edp") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert layout.rank_groups(2) == {"tp": [2, 3], "dp": [0, 2, 4, 6], "ep": [0, 2], "edp": [2, 3, 6, 7]}
    assert layout.coords(6) == (0, 1, 1)


def test_world4_tp2_dp2_ep2_groups():
    layout = ParallelLayout(4, tp=2, ep=2, dp=2)
    assert layout.edp == 2
    assert layout.groups("tp") == [[0, 1], [2, 3]]
    assert layout.groups("dp") == [[0, 2], [1, 3]]
    assert layout.groups("ep") == [[0, 2], [1, 3]]  # EP spans all of DP
    assert layout.groups("edp") == [[0, 1], [2, 3]]  # TP ranks share an expert shard


LAYOUTS = [(1, 1, 1), (4, 1, 2), (8, 1, 4), (8, 2, 2), (16, 2, 4), (12, 3, 2)]


@pytest.mark.parametrize("world,tp,ep", LAYOUTS)
def test_groups_partition_the_world(world, tp, ep):
    layout = ParallelLayout(world, tp=tp, ep=ep)
    sizes = {"tp": tp, "dp": world // tp, "ep": ep, "edp": world // ep}
    for kind in GROUP_KINDS:
        groups = layout.groups(kind)
        assert sorted(r for g in groups for r in g) == list(range(world))
        assert {len(g) for g in groups} == {sizes[kind]}
    for rank in range(world):
        mine = layout.rank_groups(rank)
        # EP lies inside DP; expert-DP spans the TP ranks and the rest of DP; the two
        # meet only at this rank, and together with TP they cover the world.
        assert set(mine["ep"]) <= set(mine["dp"])
        assert set(mine["ep"]) & set(mine["edp"]) == {rank}
        assert set(mine["tp"]) <= set(mine["edp"])


def test_describe_world8():
    text = ParallelLayout(8, tp=2, ep=2).describe()
    assert text.splitlines()[0] == (
        "world 8 = tp 2 x dp 4; experts in ep 2 shards, each held by edp 4 ranks "
        "(rank = t + tp*(e + ep*d))")
    assert "ep   4 x 2: [0,2] [1,3] [4,6] [5,7]" in text
    assert "edp  2 x 4: [0,1,4,5] [2,3,6,7]" in text
    assert len(text.splitlines()) == 5


@pytest.mark.parametrize("kwargs,message", [
    (dict(world_size=6, tp=4), "world size 6 is not dp*tp (parallel.tp (4) does not divide it)"),
    (dict(world_size=6, tp=2, dp=4),
     "world size 6 is not dp*tp (parallel.dp (4) * parallel.tp (2) = 8)"),
    (dict(world_size=8, tp=2, ep=3), "parallel.ep (3) must divide the data-parallel size (4)"),
    (dict(world_size=4, tp=0), "parallel.tp (0) must be a positive integer"),
])
def test_layout_errors(kwargs, message):
    with pytest.raises(ValueError) as err:
        ParallelLayout(**kwargs)
    assert str(err.value) == message


def test_validate_num_experts():
    ParallelLayout(8, ep=4).validate(8)
    with pytest.raises(ValueError) as err:
        ParallelLayout(8, ep=4).validate(6)
    assert str(err.value) == "moe.num_experts (6) must be divisible by parallel.ep (4)"


def _build(rank, world_size, tp, ep):
    pg = build_process_groups(ParallelLayout(world_size, tp=tp, ep=ep))
    seen = {}
    for kind in GROUP_KINDS:
        group = getattr(pg, kind)
        ranks = [None] * dist.get_world_size(group)
        dist.all_gather_object(ranks, rank, group=group)
        seen[kind] = ranks
    return pg.ranks, seen, pg.index("ep")


def test_build_process_groups_world4_tp2_ep2():
    layout = ParallelLayout(4, tp=2, ep=2)
    for rank, (ranks, seen, ep_index) in enumerate(run_ranks(_build, 4, (2, 2), timeout=60)):
        assert ranks == layout.rank_groups(rank)
        assert seen == ranks  # the torch groups really contain those ranks, in that order
        assert ep_index == layout.coords(rank)[1]
