"""The DeepSpeed engine (ZeRO 1 and 2) trains like one process over every layout: the loss and
every clipped gradient of 3 AdamW steps, and the parameters after them, match a single-process
run with the same seed and global batch.

Tolerance: the model runs in float64, but ZeRO 1/2 keep float32 master weights, Adam state
and gradient partitions (`single_partition_of_fp32_groups`; the full-grad read-back is float32
too) and compute the clipping norm in float32. Measured worst over layouts and stages:
params 4.7e-7 (a few float32 ulps of O(1) weights), grads 2.2e-8, losses 4.4e-9. Without
each fix in dmoe.train.engines.deepspeed_adapter the grads are off by >3e-2 (no TP sum of the
router, no model-parallel tag on the norm) or the run fails (no expert groups).
"""
import logging
import os

import deepspeed  # noqa: F401  (a required dependency: imported once, ranks fork with it)
import pytest
import torch.distributed as dist

from dmoe.parallel.layout import ParallelLayout, build_process_groups
from dmoe.parallel.parallelize import parallelize
from dmoe.train.engines import DeepSpeedEngine
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

TOL = {"loss": 2e-8, "grad": 1e-7, "param": 2e-6}


def _deepspeed_env(rank: int, world: int) -> None:
    # torch.distributed is already up (gloo over a FileStore), but DeepSpeed asserts that
    # LOCAL_RANK is set; the rest keep its env consistent (the port is never opened). No
    # LOCAL_SIZE: with it every rank leaves a 66 MB /dev/shm/deepspeed_allreduce_buffer_*.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def _full_grads(engine, groups) -> dict:
    """Every reduced gradient, unsharded. ZeRO keeps grads in its partitions: read each back
    (a collective over the param's ZeRO group), then gather TP and EP shards as for .grad."""
    from deepspeed.utils import safe_get_full_grad

    model = engine.module
    saved = {}
    for p in model.parameters():
        if not p.requires_grad:  # a router's expert bias: no gradient
            continue
        saved[p] = p.grad
        p.grad = safe_get_full_grad(p).to(p.dtype).reshape(p.shape)
    out = full_tensors(model, groups, grads=True)
    for p, g in saved.items():
        p.grad = g
    return out


def _deepspeed_run(rank, world, tp, ep, stage, extra=()):
    _deepspeed_env(rank, world)
    cfg = tiny_config(tp, ep, [f"--train.zero_stage={stage}", *extra])
    groups = build_process_groups(ParallelLayout(world, tp=tp, ep=ep), rank)
    engine = DeepSpeedEngine(parallelize(build_full_model(cfg), groups), cfg, groups)
    losses, grads, dropped, norms = [], [], 0, []
    for step in range(STEPS):
        out = engine.forward(*batch(step, groups.index("dp")))
        engine.backward(out.loss)
        step_grads = _full_grads(engine, groups)
        norm = engine.step(cfg.train.lr)
        norms.append(norm)
        dropped += sum(int(s.dropped) for s in out.moe_stats)
        if cfg.moe.bias_update_rate:
            update_router_biases(engine.module, [out], groups, cfg.moe.bias_update_rate)
        coef = min(1.0, cfg.train.grad_clip / ((norm or 0.0) + 1e-6))  # what DeepSpeed applied
        grads.append({k: g * coef for k, g in step_grads.items()})
        loss = out.loss.detach().clone()
        dist.all_reduce(loss, group=groups.dp)
        losses.append(float(loss) / groups.size("dp"))
    return losses, grads, full_tensors(engine.module, groups, grads=False), dropped, norms


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _worst(results, reference) -> dict:
    """Largest difference over ranks and steps of loss, every grad and the final params."""
    ref_losses, ref_grads, ref_params = reference
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0}
    for losses, grads, params, _, _ in results:
        worst["loss"] = max([worst["loss"]] + [abs(a - b) for a, b in zip(losses, ref_losses)])
        for step in range(STEPS):
            worst["grad"] = max(worst["grad"], _max_diff(grads[step], ref_grads[step]))
        worst["param"] = max(worst["param"], _max_diff(params, ref_params))
    return worst


@pytest.mark.parametrize("stage", [1, 2], ids=["zero1", "zero2"])
@pytest.mark.parametrize("world,tp,ep", LAYOUTS, ids=[f"w{w}-tp{t}-ep{e}" for w, t, e in LAYOUTS])
def test_deepspeed_engine_matches_single_process(world, tp, ep, stage):
    reference = reference_run(tiny_config(tp, ep), dp=world // tp)
    results = run_ranks(_deepspeed_run, world, args=(tp, ep, stage), timeout=300)
    # not trivial: DeepSpeed clipped (norm above train.grad_clip), and without TP (dropless
    # there) capacity dropped tokens
    assert max(max(r[4]) for r in results) > tiny_config(tp, ep).train.grad_clip
    if tp == 1:
        assert sum(r[3] for r in results) > 0
    worst = _worst(results, reference)
    print(f"max abs diff world={world} tp={tp} ep={ep} zero={stage}: {worst}")
    assert all(worst[k] < TOL[k] for k in TOL), worst


DEEPSEEK_LAYOUTS = [(2, 1, 2), (4, 2, 2)]


@pytest.mark.parametrize("stage", [1, 2], ids=["zero1", "zero2"])
@pytest.mark.parametrize("world,tp,ep", DEEPSEEK_LAYOUTS,
                         ids=[f"w{w}-tp{t}-ep{e}" for w, t, e in DEEPSEEK_LAYOUTS])
def test_deepseek_options_under_deepspeed(world, tp, ep, stage):
    """deepseek-tiny's architecture (loss-free bias included) under ZeRO 1/2."""
    reference = reference_run(tiny_config(tp, ep, DEEPSEEK), dp=world // tp)
    results = run_ranks(_deepspeed_run, world, args=(tp, ep, stage, DEEPSEEK), timeout=300)
    worst = _worst(results, reference)
    print(f"deepseek options, max abs diff world={world} tp={tp} ep={ep} zero={stage}: {worst}")
    assert all(worst[k] < TOL[k] for k in TOL), worst
    assert reference[2]["blocks.1.ffn.router.expert_bias"].abs().max() > 0


def test_zero0_with_expert_parallel_is_refused():
    from dmoe.config import ConfigError
    from dmoe.train.engines import check_deepspeed

    check_deepspeed(tiny_config(1, 2, ["--train.zero_stage=1"]))
    check_deepspeed(tiny_config(2, 1, ["--train.zero_stage=0"]))
    with pytest.raises(ConfigError, match=r"^train.zero_stage \(0\) with parallel.ep \(2\) and "
                                          r"train.grad_clip \(0.5\): DeepSpeed's ZeRO-0 clipping"):
        check_deepspeed(tiny_config(1, 2, ["--train.zero_stage=0"]))
