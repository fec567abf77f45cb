"""The chunked, overlapped EP pipeline (parallel.a2a_chunks) and the checked count exchange.

Chunked: on real gloo ranks, against the one-process reference of test_ep_dispatch (fp64,
1e-12, outputs and every gradient) and against the unchunked dispatcher on the same
tokens; the chunk arithmetic against hand-computed splits. Count exchange: a rank whose
layer disagrees (row width, dtype, layer id) makes every rank fail with one line naming
the layer, the group and both values, within the timeout (no hang)."""
import pytest
import torch

from dmoe.config import ConfigError, load_config
from dmoe.moe.dispatcher import CapacitySettings
from dmoe.moe.layer import MoELayer
from dmoe.parallel.expert_parallel.apply import shard_moe_layer, shard_moe_layers
from dmoe.parallel.expert_parallel.chunk_plan import plan_chunks
from tests._dist import run_ranks
from tests.distributed.equivalence import reference_run, tiny_config
from tests.distributed.test_ep_dispatch import (
    F_,
    D,
    E,
    T,
    check,
    make_layer,
    make_tokens,
    run_layer,
)
from tests.distributed.test_training_equivalence import _max_diff, _torch_engine_run


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("chunks", [2, 3])
@pytest.mark.parametrize("cf", [0.5, None])
def test_chunked_matches_reference(world, chunks, cf):
    dropped, received = check(world, 2, cf, [T + 2 * r for r in range(world)], chunks=chunks)
    assert (dropped == 0) if cf is None else (dropped > 0)
    assert sum(received) > 0


def test_chunked_with_empty_rank_and_hot_expert():
    check(4, 1, None, [T] * 4, hot=5, chunks=2)  # three ranks receive nothing
    check(2, 2, 1.0, [T, 0], chunks=4)  # more chunks than some blocks have rows


def _chunked_vs_unchunked(rank, world, cf, chunks):
    x, target = make_tokens(rank, T + 5 * rank)
    runs = [run_layer(shard_moe_layer(make_layer(2, cf), chunks=c), x, target) for c in (1, chunks)]
    (y1, xg1, g1, _), (yc, xgc, gc, _) = runs
    diffs = [(y1 - yc).abs().max(), (xg1 - xgc).abs().max()]
    diffs += [(g1[n] - gc[n]).abs().max() for n in g1]
    return max(float(d) for d in diffs)


@pytest.mark.parametrize("cf", [1.0, None])
def test_chunked_matches_unchunked(cf):
    assert max(run_ranks(_chunked_vs_unchunked, 2, (cf, 3), timeout=60)) <= 1e-12


def test_plan_chunks_hand_computed():
    # this rank sends [3, 1] rows to rank 0's experts, [0, 2] to rank 1's; receives
    # [3, 1] from rank 0 and [2, 2] from rank 1 (rows of one block ordered by expert)
    c0, c1 = plan_chunks([[3, 1], [0, 2]], [[3, 1], [2, 2]], 2)
    # blocks of 4, 2 (sent) and 4, 4 (received) cut at n // 2
    assert c0.send_splits == [2, 1] and c1.send_splits == [2, 1]
    assert c0.send_ranges == [(0, 2), (4, 5)] and c1.send_ranges == [(2, 4), (5, 6)]
    assert c0.recv_splits == [2, 2] and c1.recv_splits == [2, 2]
    # from rank 0 rows 0-1 are expert 0's, rows 2-3 split 1 / 1; from rank 1 2 / 0, 0 / 2
    assert c0.recv_counts_SL == [[2, 0], [2, 0]] and c1.recv_counts_SL == [[1, 1], [0, 2]]
    (only,) = plan_chunks([[1, 0]], [[0, 5]], 1)
    assert only.send_splits == [1] and only.recv_counts_SL == [[0, 5]]
    with pytest.raises(ValueError, match=r"parallel.a2a_chunks \(0\) must be >= 1"):
        plan_chunks([[1]], [[1]], 0)


def _mismatch(rank, world, what):
    torch.manual_seed(0)
    d = D + 2 if (what == "row width" and rank == 1) else D
    layer = MoELayer(d, E, 2, F_, CapacitySettings(None, None, 0, "position")).double()
    shard_moe_layer(layer)
    layer.dispatcher.set_layer_id(7 + rank if what == "layer id" else 7)
    x = torch.randn(1, T, d, dtype=torch.double)
    if what == "row dtype" and rank == 1:
        layer.float()
        x = x.float()
    try:
        layer(x)
    except RuntimeError as err:
        return str(err)
    return None


@pytest.mark.parametrize("what,mine,theirs", [("row width", "6", "8"), ("row dtype", "float64", "float32"),
                                              ("layer id", "7", "8")])
def test_count_exchange_refuses_disagreeing_peers(what, mine, theirs):
    errors = run_ranks(_mismatch, 2, (what,), timeout=60)
    layer = "7"
    for rank, err in enumerate(errors):
        a, b = (mine, theirs) if rank == 0 else (theirs, mine)
        peer = 1 - rank
        if what == "layer id":
            layer = a
        assert err == (f"expert-parallel count exchange, MoE layer {layer}, EP group of global "
                       f"ranks [0, 1]: rank {peer} has {what} {b}, rank {rank} has {a}")


@pytest.mark.parametrize("tp", [1, 2])
def test_training_with_chunks_matches_single_process(tp):
    """parallel.a2a_chunks through config -> parallelize -> the torch engine, DP x EP2 and
    TP2 x EP2 on 4 ranks, an expert-recomputing variant for TP: losses, gradients and
    parameters after 3 steps as one process (fp64, 1e-12)."""
    extra = ["--parallel.a2a_chunks=2"]
    if tp > 1:
        extra.append("--train.activation_checkpointing=experts")
    ref_losses, ref_grads, ref_params = reference_run(tiny_config(tp, 2, extra), dp=4 // tp)
    for losses, grads, params, _, _ in run_ranks(_torch_engine_run, 4, (tp, 2, extra), timeout=180):
        assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-12
        assert max(_max_diff(g, r) for g, r in zip(grads, ref_grads)) < 1e-12
        assert _max_diff(params, ref_params) < 1e-12


def test_chunks_config_errors():
    with pytest.raises(ConfigError, match=r"^parallel.a2a_chunks \(0\) must be >= 1$"):
        load_config(None, ["--parallel.a2a_chunks=0"])
    with pytest.raises(ConfigError, match=r"^parallel.a2a_chunks \(2\) > 1 needs parallel.a2a_dedup false"):
        load_config(None, ["--parallel.a2a_chunks=2", "--parallel.a2a_dedup=true"])


def _other_expert_count(rank, world):
    torch.manual_seed(0)
    model = torch.nn.ModuleList([MoELayer(D, E if rank == 0 else E // 2, 2, F_,
                                          CapacitySettings(None, None, 0, "position"))])
    try:
        shard_moe_layers(model)
    except RuntimeError as err:
        return str(err)
    return None


def test_a_different_expert_count_is_refused_before_any_exchange():
    # the counts message is sized by the local expert count: checked once, at sharding
    errors = run_ranks(_other_expert_count, 2, timeout=60)
    for rank, err in enumerate(errors):
        mine, theirs = ([(E, D)], [(E // 2, D)]) if rank == 0 else ([(E // 2, D)], [(E, D)])
        assert err == (f"expert parallelism, EP group of global ranks [0, 1]: rank {1 - rank} has "
                       f"MoE layers (num_experts, d_model) {theirs}, rank {rank} has {mine}")
