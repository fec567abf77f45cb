"""Expert parallelism against the unsharded layer, on real gloo ranks (world size = EP).

Every rank builds the same full MoELayer from one seed and feeds it DIFFERENT tokens.
Reference, per rank r: the full layer on r's tokens gives r's output, input grad and gate
grad (the gate is replicated; each replica sees only its rank's tokens). An expert's
weights live on one rank but serve every rank's tokens, so the reference gradient of
rank r's expert slice is the sum over all ranks s of the full layer's grad on s's tokens,
sliced to r's experts. Each rank recomputes every rank's tokens locally for that sum.
"""
import pytest
import torch

from dmoe.moe.dispatcher import CapacitySettings
from dmoe.moe.layer import MoELayer
from dmoe.parallel.expert_parallel.all_to_all import all_to_all
from dmoe.parallel.expert_parallel.apply import shard_moe_layer
from dmoe.parallel.expert_parallel.dispatcher import local_expert_order
from dmoe.parallel.param_roles import is_expert
from tests._dist import run_ranks

T, D, F_, E = 12, 6, 10, 8


def make_layer(k, cf, hot_expert=None, exact=True):
    torch.manual_seed(0)
    layer = MoELayer(D, E, k, F_, CapacitySettings(cf, cf, 0, "position")).double()
    if exact:  # experts compute in float64 too: any mismatch is then a dispatch bug
        layer.experts.compute_dtype = torch.float64
    with torch.no_grad():
        layer.router.gate.weight[0] += 0.8  # skewed, so capacity bites
        if hot_expert is not None:  # feature 0 is 1 on every token: all first choices here
            layer.router.gate.weight[:, 0] = 0.0
            layer.router.gate.weight[hot_expert, 0] = 40.0
    return layer


def make_tokens(rank, n, hot_expert=None):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n, D, dtype=torch.double, generator=gen)
    if hot_expert is not None:
        x[:, 0] = 1.0
    return x, torch.randn(n, D, dtype=torch.double, generator=gen)


def run_layer(layer, x, target):
    x = x.clone().requires_grad_()
    layer.zero_grad()
    y, stats = layer(x.view(1, x.shape[0], D))
    (y.reshape(-1, D) * target).sum().backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for n, p in layer.named_parameters()}
    return y.reshape(-1, D).detach(), x.grad, grads, stats


def reference(rank, world, k, cf, counts, hot, exact):
    layer = make_layer(k, cf, hot, exact)
    runs = [run_layer(layer, *make_tokens(s, counts[s], hot)) for s in range(world)]
    y, x_grad, grads, stats = runs[rank]
    per_rank = E // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    for name in ("experts.w1", "experts.w2"):
        grads[name] = sum(run[2][name] for run in runs)[rows]
    return y, x_grad, grads, stats


def _ep_vs_local(rank, world, k, cf, counts, hot, exact, dedup=False, chunks=1):
    y_ref, xg_ref, g_ref, stats_ref = reference(rank, world, k, cf, counts, hot, exact)
    layer = shard_moe_layer(make_layer(k, cf, hot, exact), dedup=dedup, chunks=chunks)
    received = []  # rows this rank's experts were given
    layer.experts.register_forward_pre_hook(lambda _, args: received.append(sum(args[1])))
    y, xg, grads, stats = run_layer(layer, *make_tokens(rank, counts[rank], hot))
    assert torch.equal(stats.routed_E, stats_ref.routed_E)
    assert torch.equal(stats.kept_E, stats_ref.kept_E)
    assert stats.capacity == stats_ref.capacity
    assert all(is_expert(p) and not p.allreduce and p.group_name == f"ep_size_{world}"
               for p in layer.experts.parameters())
    diffs = {"y": (y - y_ref), "x.grad": (xg - xg_ref)}
    diffs.update({name: grads[name] - g_ref[name] for name in g_ref})
    diffs = {name: float(d.abs().max()) if d.numel() else 0.0 for name, d in diffs.items()}
    assert len(received) == chunks  # chunked: the experts run once per chunk
    return diffs, int(stats.dropped), layer.experts.w1.shape[0], sum(received)


def check(world, k, cf, counts, hot=None, exact=True, tol=1e-12, dedup=False, chunks=1):
    """Runs the comparison on `world` ranks; returns (total dropped, rows received per rank)."""
    results = run_ranks(_ep_vs_local, world, (k, cf, counts, hot, exact, dedup, chunks), timeout=60)
    for diffs, _, num_local, _ in results:
        assert num_local == E // world
        bad = {n: d for n, d in diffs.items() if d > tol}
        assert not bad, f"max abs diffs over {tol}: {bad}"
    return sum(r[1] for r in results), [r[3] for r in results]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("cf", [0.5, 1.0, None])
def test_ep_matches_local(world, k, cf):
    counts = [T + 2 * r for r in range(world)]  # uneven token counts too
    dropped, _ = check(world, k, cf, counts)
    assert (dropped == 0) if cf is None else (dropped > 0)


def test_ep_matches_local_fp32_experts():
    # The default expert dtype (float32): rows are regrouped, so results agree to fp32 rounding.
    check(2, 2, 1.0, [T, T + 3], exact=False, tol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("cf", [1.0, None])
def test_all_tokens_to_one_expert(k, cf):
    # Expert 5 lives on rank 2 of 4: with k=1 the other ranks receive no rows at all.
    dropped, received = check(4, k, cf, [T] * 4, hot=5)
    assert (dropped == 0) if cf is None else (dropped > 0)
    if k == 1:
        assert received == [0, 0, 4 * T if cf is None else 4 * -(-T // E), 0]  # capacity per rank


@pytest.mark.parametrize("world,counts", [(2, [T, 0]), (4, [0, T, 3, T])])
@pytest.mark.parametrize("cf", [1.0, None])
def test_rank_without_tokens(world, counts, cf):
    check(world, 2, cf, counts)


def test_local_expert_order():
    # 2 sources x 2 local experts: blocks (s0,e0)=2 rows, (s0,e1)=1, (s1,e0)=0, (s1,e1)=2.
    counts_SL = torch.tensor([[2, 1], [0, 2]])
    # received rows 0,1 (s0 e0), 2 (s0 e1), 3,4 (s1 e1) -> expert 0: 0,1; expert 1: 2,3,4
    assert local_expert_order(counts_SL).tolist() == [0, 1, 2, 3, 4]
    counts_SL = torch.tensor([[1, 2], [3, 0]])
    # rows: 0 (s0 e0), 1,2 (s0 e1), 3,4,5 (s1 e0) -> expert 0: 0,3,4,5; expert 1: 1,2
    assert local_expert_order(counts_SL).tolist() == [0, 3, 4, 5, 1, 2]


def _a2a_hand(rank, world):
    # rank 0 sends 1 row to itself and 2 to rank 1; rank 1 sends 1 row to itself.
    if rank == 0:
        x, in_splits, out_splits = torch.tensor([[0.0], [1.0], [2.0]]), [1, 2], [1, 0]
    else:
        x, in_splits, out_splits = torch.tensor([[10.0]]), [0, 1], [2, 1]
    x.requires_grad_()
    out = all_to_all(x, out_splits, in_splits)
    weight = 100.0 * (rank + 1) + torch.arange(out.shape[0], dtype=x.dtype).unsqueeze(1)
    (out * weight).sum().backward()
    return out.detach(), x.grad


def test_all_to_all_hand_computed():
    (out0, grad0), (out1, grad1) = run_ranks(_a2a_hand, 2, timeout=60)
    assert out0.flatten().tolist() == [0.0]
    assert out1.flatten().tolist() == [1.0, 2.0, 10.0]
    # d/dx: each row's grad is the weight of the slot it landed in, sent back.
    assert grad0.flatten().tolist() == [100.0, 200.0, 201.0]
    assert grad1.flatten().tolist() == [202.0]


# ---------------------------------------------------------------- one row per (token, rank)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("cf", [0.5, None])
def test_dedup_ep_matches_local(world, k, cf):
    counts = [T + 2 * r for r in range(world)]
    dropped, _ = check(world, k, cf, counts, dedup=True)
    assert (dropped == 0) if cf is None else (dropped > 0)


@pytest.mark.parametrize("world,counts,hot", [(4, [T] * 4, 5), (4, [0, T, 3, T], None)])
def test_dedup_skewed_and_empty_ranks(world, counts, hot):
    check(world, 2, 1.0, counts, hot=hot, dedup=True)


def _dedup_rows(rank, world, groups):
    """Group-limited routing with one group per EP rank: each token's rows reach at most
    topk_groups ranks, and the dispatch all-to-all moves exactly the unique (token, rank)
    rows computed here from the routing."""
    from dmoe.parallel import comm_trace
    from dmoe.parallel.comm_trace import CommRecorder

    torch.manual_seed(0)
    num_groups, topk_groups = groups
    layer = MoELayer(D, E, 4, F_, CapacitySettings(None, None, 0, "position"),
                     num_groups=num_groups, topk_groups=topk_groups).double()
    layer.experts.compute_dtype = torch.float64
    x = make_tokens(rank, 3 * T)[0]
    routing = layer.router(x)
    owners = (routing.expert_idx_TK // (E // world)).tolist()
    unique_rows = sum(len(set(o)) for o in owners)
    shard_moe_layer(layer, dedup=True)
    rec = CommRecorder()
    with comm_trace.recording(rec):
        rec.start_step(0)
        y, _ = layer(x.view(1, -1, D))
        y.sum().backward()
        events = rec.end_step()
    sent = next(e for e in events if e.name == "a2a_dispatch" and e.phase == "fwd")
    return max(len(set(o)) for o in owners), unique_rows, sum(sent.send_bytes) // (D * 8)


def test_group_limited_routing_bounds_ranks_per_token():
    for most, unique_rows, sent_rows in run_ranks(_dedup_rows, 2, ((2, 1),)):
        assert most == 1  # one group per EP rank, one group per token: one rank per token
        assert sent_rows == unique_rows == 3 * T  # k = 4 rows per token, one sent
    for most, unique_rows, sent_rows in run_ranks(_dedup_rows, 2, ((1, 1),)):
        assert most == 2 and sent_rows == unique_rows > 3 * T  # without groups: more
