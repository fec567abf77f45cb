"""Host synchronisations per MoE layer: one `.tolist()` (after the count exchange) per
forward, none in backward, for the local and both expert-parallel dispatchers; and the
steps before it build no data-dependent shapes (they run on the meta device, where a
bincount, boolean mask, unique or unsized repeat_interleave would raise)."""
from contextlib import contextmanager

import pytest
import torch

from dmoe.moe.capacity import count_per_expert
from dmoe.moe.dispatcher import CapacitySettings, permute_tokens
from dmoe.moe.router import Routing
from dmoe.parallel.expert_parallel.apply import shard_moe_layer
from dmoe.parallel.expert_parallel.dispatcher import local_expert_order
from tests._dist import run_ranks
from tests.distributed.test_ep_dispatch import make_layer, make_tokens


@contextmanager
def counting_host_reads():
    """Counts every Tensor.tolist() and Tensor.item() (reads of device values into Python)."""
    calls = [0]
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "item")}

    def counted(original):
        def read(self, *args, **kwargs):
            calls[0] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _syncs(layer, x):
    with counting_host_reads() as calls:
        y, _ = layer(x)
        forward = calls[0]
        y.square().sum().backward()
    return forward, calls[0] - forward


def _ep(rank, world, dedup, chunks=1):
    layer = shard_moe_layer(make_layer(2, 1.0), dedup=dedup, chunks=chunks)
    x, _ = make_tokens(rank, 9 + rank)
    return _syncs(layer, x.view(1, -1, x.shape[-1]).requires_grad_())


@pytest.mark.parametrize("dedup,chunks", [(False, 1), (True, 1), (False, 3)])
def test_expert_parallel_dispatch_syncs_once(dedup, chunks):
    # chunks: the overlapped pipeline (parallel.a2a_chunks) cuts its chunks on the host
    assert run_ranks(_ep, 2, args=(dedup, chunks), timeout=90) == [(1, 0), (1, 0)]


def test_local_dispatch_syncs_once():
    layer = make_layer(2, 1.0)
    x, _ = make_tokens(0, 12)
    assert _syncs(layer, x.view(1, -1, x.shape[-1]).requires_grad_()) == (1, 0)


@pytest.mark.parametrize("policy", ["position", "probability"])
@pytest.mark.parametrize("factor", [1.0, None])
def test_the_steps_before_the_count_exchange_have_static_shapes(policy, factor):
    T, K, E = 16, 2, 8
    meta = {"device": "meta"}
    routing = Routing(torch.empty(T, K, dtype=torch.int64, **meta), torch.empty(T, K, **meta),
                      torch.empty(T, K, **meta), *(torch.empty((), **meta),) * 3)
    plan, token_idx_N, gate_N, _ = permute_tokens(
        routing, T, E, CapacitySettings(factor, factor, 0, policy), True, compact=False)
    assert token_idx_N.shape == gate_N.shape == (T * K,) and plan.counts_E.shape == (E,)
    assert count_per_expert(routing.expert_idx_TK, E).shape == (E,)
    assert local_expert_order(torch.empty(2, 4, dtype=torch.int64, **meta), 32).shape == (32,)


def test_uncompacted_plan_puts_the_kept_rows_first():
    from dmoe.moe.capacity import plan_capacity
    gen = torch.Generator().manual_seed(0)
    idx, score = torch.randint(0, 4, (40,), generator=gen), torch.rand(40, generator=gen)
    for policy in ("position", "probability"):
        compact = plan_capacity(idx, score, 4, 6, policy)
        full = plan_capacity(idx, score, 4, 6, policy, compact=False)
        kept = int(compact.counts_E.sum())
        assert torch.equal(full.order_N[:kept], compact.order_N)
        assert sorted(full.order_N.tolist()) == list(range(40))
        assert torch.equal(count_per_expert(idx, 4), torch.bincount(idx, minlength=4))
