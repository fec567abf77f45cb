"""bench-comm with a world size its group size does not divide: the rank outside the
measured group must not hang the others (it used to skip a default-group barrier)."""
from dmoe.tools.bench_comm import measured_groups, run_bench
from tests._dist import run_ranks


def _bench(rank, world):
    import torch
    return run_bench(torch.device("cpu"), [4096], iters=2, warmup=1)


def test_world3_group2_does_not_hang():
    assert measured_groups(3, 2) == [[0, 1]]
    rows = run_ranks(_bench, 3, timeout=60)
    for r in rows:
        assert [row["group_size"] for row in r] == [2]
        assert r[0]["time_us"] > 0  # the slowest measured rank's time, on every rank
    assert rows[0] == rows[2]
