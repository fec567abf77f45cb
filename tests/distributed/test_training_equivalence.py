"""Every layout trains like one process: loss, every gradient and the parameters after 3
optimizer steps equal a single-process run with the same seed and global batch."""
import pytest
import torch.distributed as dist

from dmoe.parallel.layout import ParallelLayout, build_process_groups
from dmoe.parallel.parallelize import parallelize
from dmoe.train.engines import TorchEngine
from dmoe.train.step import update_router_biases
from tests._dist import run_ranks

from .equivalence import (
    DEEPSEEK,
    LAYOUTS,
    STEPS,
    batch,
    build_full_model,
    full_tensors,
    reference_run,
    tiny_config,
)


def _torch_engine_run(rank, world, tp, ep, extra=()):
    cfg = tiny_config(tp, ep, extra)
    groups = build_process_groups(ParallelLayout(world, tp=tp, ep=ep), rank)
    model = parallelize(build_full_model(cfg), groups)
    engine = TorchEngine(model, cfg, groups)
    losses, grads, dropped, norms = [], [], 0, []
    for step in range(STEPS):
        out = engine.forward(*batch(step, groups.index("dp")))
        engine.backward(out.loss)
        norms.append(engine.step(cfg.train.lr))  # the norm before clipping
        dropped += sum(int(s.dropped) for s in out.moe_stats)
        if cfg.moe.bias_update_rate:
            update_router_biases(engine.module, [out], groups, cfg.moe.bias_update_rate)
        loss = out.loss.detach().clone()
        dist.all_reduce(loss, group=groups.dp)
        losses.append(float(loss) / groups.size("dp"))
        grads.append(full_tensors(model, groups, grads=True))
    return losses, grads, full_tensors(model, groups, grads=False), dropped, norms


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("world,tp,ep", LAYOUTS, ids=[f"w{w}-tp{t}-ep{e}" for w, t, e in LAYOUTS])
def test_torch_engine_matches_single_process(world, tp, ep):
    ref_losses, ref_grads, ref_params = reference_run(tiny_config(tp, ep), dp=world // tp)
    results = run_ranks(_torch_engine_run, world, args=(tp, ep), timeout=180)
    worst = {"loss": 0.0, "grad_step0": 0.0, "grad": 0.0, "param": 0.0}
    # the cases are not trivial: clipping was active, and (without TP, where the layouts run
    # dropless) capacity dropped tokens
    assert max(max(r[4]) for r in results) > tiny_config(tp, ep).train.grad_clip
    if tp == 1:
        assert sum(r[3] for r in results) > 0
    for losses, grads, params, _, _ in results:
        worst["loss"] = max([worst["loss"]] + [abs(a - b) for a, b in zip(losses, ref_losses)])
        worst["grad_step0"] = max(worst["grad_step0"], _max_diff(grads[0], ref_grads[0]))
        for step in range(STEPS):
            worst["grad"] = max(worst["grad"], _max_diff(grads[step], ref_grads[step]))
        worst["param"] = max(worst["param"], _max_diff(params, ref_params))
    print(f"max abs diff world={world} tp={tp} ep={ep}: {worst}")
    # float64 throughout: equal up to summation order
    assert max(worst.values()) < 1e-12, worst
    # the layouts must not all be trivially equal: parameters moved
    start = build_full_model(tiny_config(tp, ep))
    assert max(float((p - ref_params[n]).abs().max()) for n, p in start.named_parameters()) > 1e-3


DEEPSEEK_LAYOUTS = [(2, 1, 2), (4, 2, 2), (4, 1, 4)]


@pytest.mark.parametrize("world,tp,ep", DEEPSEEK_LAYOUTS,
                         ids=[f"w{w}-tp{t}-ep{e}" for w, t, e in DEEPSEEK_LAYOUTS])
def test_deepseek_options_match_single_process(world, tp, ep):
    """Sigmoid + groups + loss-free bias + sequence loss + shared expert + dense first block:
    every rank ends each step with the reference's expert bias (compared as a parameter)."""
    cfg = tiny_config(tp, ep, DEEPSEEK)
    ref_losses, ref_grads, ref_params = reference_run(cfg, dp=world // tp)
    results = run_ranks(_torch_engine_run, world, args=(tp, ep, DEEPSEEK), timeout=180)
    for losses, grads, params, _, _ in results:
        assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-12
        assert max(_max_diff(g, r) for g, r in zip(grads, ref_grads)) < 1e-12
        assert _max_diff(params, ref_params) < 1e-12
    bias = ref_params["blocks.1.ffn.router.expert_bias"]
    assert bias.abs().max() > 0  # the bias moved: the update was exercised
