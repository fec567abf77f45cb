"""build_local_model (meta build, parallelize, materialise the local shard) equals the full
seeded build then parallelize, bit for bit, on every rank of dp2ep2, tp2 and ep2tp2: every
parameter, its parallel roles, ties and the buffers, and the RNG state after the build."""
import pytest
import torch

from dmoe.model.local_build import build_local_model
from dmoe.model.transformer import MoETransformer
from dmoe.parallel.layout import ParallelLayout, build_process_groups
from dmoe.parallel.parallelize import parallelize
from tests._dist import run_ranks

from .equivalence import DEEPSEEK, tiny_config

ROLES = ("dmoe_expert", "dmoe_tp_sharded", "dmoe_tp_partial", "allreduce", "group_name")


def _compare(rank, world, tp, ep, extra):
    torch.set_num_threads(1)
    cfg = tiny_config(tp, ep, extra)
    groups = build_process_groups(ParallelLayout(world, tp=tp, ep=ep), rank)
    torch.manual_seed(cfg.train.seed)
    old = parallelize(MoETransformer(cfg), groups)
    old_rng = torch.get_rng_state()
    new = build_local_model(cfg, groups)
    assert torch.equal(torch.get_rng_state(), old_rng)
    old_p, new_p = dict(old.named_parameters()), dict(new.named_parameters())
    assert list(old_p) == list(new_p)
    for name, p in old_p.items():
        q = new_p[name]
        assert q.device.type == "cpu" and q.dtype == p.dtype and q.requires_grad == p.requires_grad
        assert torch.equal(q, p), name
        assert {r: getattr(q, r, None) for r in ROLES} == {r: getattr(p, r, None) for r in ROLES}, name
    for (name, b), (name2, c) in zip(old.named_buffers(), new.named_buffers()):
        assert name == name2 and torch.equal(b, c), name
    assert (new.lm_head.weight is new.tok_emb.weight) == (old.lm_head.weight is old.tok_emb.weight)
    return len(old_p)


@pytest.mark.parametrize("world, tp, ep", [(4, 1, 2), (2, 2, 1), (4, 2, 2)],
                         ids=["dp2ep2", "tp2", "dp1tp2ep2"])
@pytest.mark.parametrize("extra", [[], [*DEEPSEEK, "--model.tie_embeddings=true"]],
                         ids=["base", "deepseek_tied"])
def test_local_build_equals_full_build_then_shard(world, tp, ep, extra):
    counts = run_ranks(_compare, world, args=(tp, ep, extra))
    assert all(c > 5 for c in counts)
