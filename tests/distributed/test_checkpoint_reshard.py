"""A checkpoint saved under one layout loads under another (on load, or through the offline
`reshard` tool): outputs on a fixed batch are unchanged, and one more training step after
the reshard equals one more step in the saving layout (AdamW state resharded too).

Every layout trains on the same global batch (4 sequences; DP rank d takes its rows), so
runs under different DP degrees are comparable. float64, dropless: differences are
summation order only."""
import pytest
import torch
import torch.distributed as dist

from dmoe.checkpoint.load import load_checkpoint
from dmoe.checkpoint.offline import export, reshard
from dmoe.checkpoint.save import save_checkpoint
from dmoe.checkpoint.slices import cut, param_slices
from dmoe.parallel.layout import ParallelLayout, build_process_groups
from dmoe.parallel.parallelize import parallelize
from dmoe.train.engines import TorchEngine
from dmoe.train.step import update_router_biases
from tests._dist import run_ranks

from .equivalence import DEEPSEEK, SEQ, VOCAB, build_full_model, full_tensors, tiny_config
from .export import load_exported

ROWS, TOL = 4, 1e-12


def _cfg(tp, ep, run_dir="unused", extra=()):
    return tiny_config(tp, ep, ["--moe.capacity_factor=null", "--moe.aux_loss_coef=0",
                                f"--train.run_dir={run_dir}", *extra])


def _global_batch(step):
    g = torch.Generator().manual_seed(500 + step)
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _train_step(engine, groups, step):
    rows = ROWS // groups.size("dp")
    d = groups.index("dp")
    x, y = (t[d * rows:(d + 1) * rows] for t in _global_batch(step))
    out = engine.forward(x, y)
    engine.backward(out.loss)
    engine.step(engine.cfg.train.lr)
    if engine.cfg.moe.bias_update_rate:
        update_router_biases(engine.module, [out], groups, engine.cfg.moe.bias_update_rate)


@torch.no_grad()
def _outputs(model, groups):
    out = model(*_global_batch(99))
    parts = [torch.empty_like(out.logits) for _ in range(groups.size("tp"))]
    dist.all_gather(parts, out.logits.contiguous(), group=groups.tp)
    return float(out.loss), torch.cat(parts, -1)


def _phase(rank, world, tp, ep, load_from, save_to, extra=()):
    """Train 2 steps (or load), fixed-batch outputs, maybe save, then train step 2."""
    cfg = _cfg(tp, ep, save_to or "unused", extra)
    groups = build_process_groups(ParallelLayout(world, tp=tp, ep=ep), rank)
    engine = TorchEngine(parallelize(build_full_model(cfg), groups), cfg, groups)
    if load_from:
        load_checkpoint(engine, groups, load_from)
    else:
        for step in range(2):
            _train_step(engine, groups, step)
    outputs = _outputs(engine.module, groups)
    saved = save_checkpoint(engine, cfg, groups, step=2) if save_to else None
    _train_step(engine, groups, 2)
    return outputs, full_tensors(engine.module, groups, grads=False), saved


def _run(world, tp, ep, load_from=None, save_to=None, extra=()):
    return run_ranks(_phase, world, args=(tp, ep, load_from, save_to, extra), timeout=120)[0]


def _diff(a, b) -> float:
    (loss_a, logits_a), params_a, _ = a
    (loss_b, logits_b), params_b, _ = b
    assert params_a.keys() == params_b.keys()
    return max([abs(loss_a - loss_b), float((logits_a - logits_b).abs().max())] +
               [float((params_a[k] - params_b[k]).abs().max()) for k in params_a])


def test_reshard_ep_2_1_4(tmp_path):
    a = _run(2, 1, 2, save_to=tmp_path / "a")
    b = _run(1, 1, 1, load_from=a[2], save_to=tmp_path / "b")
    c = _run(4, 1, 4, load_from=b[2])
    worst = max(_diff(a, b), _diff(a, c))
    print(f"EP 2->1->4 max abs diff (outputs, params after one more step): {worst:.3g}")
    assert worst < TOL


@pytest.mark.parametrize("src,dst", [((2, 2, 1), (1, 1, 1)), ((2, 1, 1), (4, 1, 1)),
                                     ((4, 2, 2), (2, 1, 2))],
                         ids=["tp2-to-tp1", "dp2-to-dp4", "tp2ep2-to-ep2"])
def test_reshard_on_load(tmp_path, src, dst):
    a = _run(*src, save_to=tmp_path / "a")
    b = _run(*dst, load_from=a[2])
    worst = _diff(a, b)
    print(f"{src} -> {dst} max abs diff: {worst:.3g}")
    assert worst < TOL


GQA = ("--model.n_kv_heads=2", "--model.qk_norm=true", "--model.bias=true",
       "--model.mlp_activation=swiglu", "--moe.num_shared_experts=1", "--moe.shared_expert_gate=true")


def test_reshard_grouped_query_attention_tp2_to_tp1_and_ep2(tmp_path):
    """qkv's unequal q/k/v chunks, biases and SwiGLU chunks travel through the manifest."""
    a = _run(2, 2, 1, save_to=tmp_path / "a", extra=GQA)
    b = _run(1, 1, 1, load_from=a[2], extra=GQA)
    c = _run(2, 1, 2, load_from=a[2], extra=GQA)
    worst = max(_diff(a, b), _diff(a, c))
    print(f"GQA tp2 -> tp1 / ep2 max abs diff: {worst:.3g}")
    assert worst < TOL


def test_reshard_loss_free_bias_ep2_to_ep1(tmp_path):
    """The routers' expert bias (training state without gradient) is saved once and
    resharded like any replicated tensor; training on from it matches."""
    a = _run(2, 1, 2, save_to=tmp_path / "a", extra=DEEPSEEK)
    b = _run(1, 1, 1, load_from=a[2], extra=DEEPSEEK)
    assert a[1]["blocks.1.ffn.router.expert_bias"].abs().max() > 0
    worst = _diff(a, b)
    print(f"loss-free bias ep2 -> ep1 max abs diff: {worst:.3g}")
    assert worst < TOL


def test_offline_reshard_and_export(tmp_path):
    a = _run(2, 1, 2, save_to=tmp_path / "a")
    out = reshard(str(a[2]), str(tmp_path / "tp2ep2"), world_size=4, tp=2, ep=2)
    b = _run(4, 2, 2, load_from=out)
    assert _diff(a, b) < TOL
    path = export(str(a[2]), str(tmp_path / "model.safetensors"))
    model = build_full_model(_cfg(1, 1))
    load_exported(model, str(path))
    with torch.no_grad():
        loss = float(model(*_global_batch(99)).loss)
    assert abs(loss - a[0][0]) < TOL


def _slices_match_live(rank, world):
    """Every live parameter equals the slice of the full model the checkpoint plan names."""
    cfg = _cfg(2, 2)
    groups = build_process_groups(ParallelLayout(world, tp=2, ep=2), rank)
    full = dict(build_full_model(cfg).named_parameters())
    model = parallelize(build_full_model(cfg), groups)
    return {s.name: (s.rule.kind if s.rule else None,
                     torch.equal(cut(full[s.name].detach(), s.rule, s.runs), s.param.detach()))
            for s in param_slices(model, groups.layout, rank)}


def test_plan_slices_match_live_sharding():
    for live in run_ranks(_slices_match_live, 4):
        assert all(same for _, same in live.values()), live
        kinds = {kind for kind, _ in live.values()}
        assert kinds == {None, "tp", "ep"}
