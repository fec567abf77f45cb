"""An imported HF checkpoint (a 1-rank, params-only dmoe checkpoint) loads under 1 rank,
ep2 and tp2 through the training path (parallelize + TorchEngine + load_checkpoint,
resharding on load): logits equal transformers' (fp32, <= 1e-5), every router chooses the
experts transformers' does, and one training step runs on from it (AdamW starts fresh).

Every rank feeds the same 2 sequences: under TP the MoE routes a token slice per rank
(gathered back here), under EP each rank routes the whole batch."""
import pytest
import torch
import torch.distributed as dist

from dmoe.checkpoint.load import load_checkpoint
from dmoe.config import load_config
from dmoe.hf.importer import import_hf
from dmoe.model.transformer import MoETransformer
from dmoe.parallel.layout import ParallelLayout, build_process_groups
from dmoe.parallel.parallelize import parallelize
from dmoe.train.engines import TorchEngine
from tests._dist import run_ranks
from tests.hf_models import MOE, hf_forward, record_routes, save_tiny, tokens

pytest.importorskip("transformers")

TOL = 1e-5
LAYOUTS = {"1rank": (1, 1, 1), "ep2": (2, 1, 2), "tp2": (2, 2, 1)}


def _gather_tp(x: torch.Tensor, dim: int, groups) -> torch.Tensor:
    if groups.size("tp") == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(groups.size("tp"))]
    dist.all_gather(parts, x.contiguous(), group=groups.tp)
    return torch.cat(parts, dim)


def _rank(rank, world, tp, ep, run_dir, ids):
    cfg = load_config(f"{run_dir}/config.yaml", [f"--parallel.tp={tp}", f"--parallel.ep={ep}"])
    groups = build_process_groups(ParallelLayout(world, tp=tp, ep=ep), rank)
    engine = TorchEngine(parallelize(MoETransformer(cfg), groups), cfg, groups)
    manifest = load_checkpoint(engine, groups, f"{run_dir}/checkpoints/step_000000")
    engine.module.eval()
    routes, handles = record_routes(engine.module)
    with torch.no_grad():
        logits = engine.module(ids).logits
    for h in handles:
        h.remove()
    logits = _gather_tp(logits, -1, groups)  # vocab-parallel head
    routes = [_gather_tp(r, 0, groups) for r in routes]  # token slices, in rank order
    engine.module.train()  # training continues from the imported weights
    before = [p.detach().clone() for p in engine.module.parameters()]
    out = engine.forward(ids[:, :-1], ids[:, 1:])
    engine.backward(out.loss)
    engine.step(cfg.train.lr)
    moved = any(not torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
    return logits, routes, float(out.loss), moved, manifest["step"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", MOE)
def test_imported_checkpoint_matches_transformers_under_layout(tmp_path, family, layout):
    hf = save_tiny(family, tmp_path / "hf")
    import_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
    ids = tokens()
    hf_logits, hf_routes = hf_forward(hf, ids)
    world, tp, ep = LAYOUTS[layout]
    results = run_ranks(_rank, world, args=(tp, ep, str(tmp_path / "run"), ids), timeout=120)
    worst = 0.0
    for logits, routes, loss, moved, step in results:
        worst = max(worst, float((logits - hf_logits).abs().max()))
        assert len(routes) == len(hf_routes) and all(torch.equal(a, b) for a, b in zip(routes, hf_routes))
        assert torch.isfinite(torch.tensor(loss)) and moved and step == 0
    print(f"{family} {layout}: max |logits diff| vs transformers {worst:.2e}")
    assert worst <= TOL
