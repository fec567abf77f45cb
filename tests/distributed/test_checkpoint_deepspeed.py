"""Checkpoints under the DeepSpeed engine (ZeRO 1 and 2), in dmoe's own format: the fp32
masters and AdamW moments come out of (and go back into) ZeRO's flat partitions through
DeepSpeed's tensor-fragment API (dmoe.checkpoint.optimizer_state).

1. Exact resume through the real training loop (float32): train 3 steps, save, continue
   3 steps; a fresh run resumed from the step-3 checkpoint gives bit-identical losses.
2. Cross-engine: a DeepSpeed save resumes under the torch engine and back; one more step
   equals one more step of the saving engine (the optimizer state continues).
3. Resharding a DeepSpeed save from ep2 to ep1.
2 and 3 compare engines or layouts in float32: the reduction order differs (ZeRO's flat
bucketed reduce vs dmoe's per-tensor all-reduce, an expert-DP group of 2 vs 1), so the
results agree to float32 rounding, not bit for bit (TOL; measured: ds->torch 0, torch->ds
and ep2->ep1 6e-8; with the optimizer state dropped 1.8e-2).
"""
import os

import deepspeed  # noqa: F401  (a required dependency: imported once, ranks fork with it)
import pytest
import torch
import torch.distributed as dist

from dmoe.checkpoint.load import load_checkpoint
from dmoe.checkpoint.save import save_checkpoint
from dmoe.config import load_config
from dmoe.model.transformer import MoETransformer
from dmoe.parallel.layout import ParallelLayout, build_process_groups
from dmoe.parallel.parallelize import parallelize
from dmoe.startup.launchers import LaunchInfo
from dmoe.train.engines import DeepSpeedEngine, TorchEngine
from dmoe.train.trainer import train
from tests._dist import run_ranks

from .equivalence import SEED, full_tensors, tiny_config
from .test_checkpoint_reshard import _global_batch
from .test_checkpoint_resume import TINY, _losses, text_dir  # noqa: F401  (fixture)
from .test_deepspeed_equivalence import _deepspeed_env

TOL = 1e-6  # float32, O(1) weights after lr 0.01 steps: a few ulps
ROWS = 4


# ---------------------------------------------------------------- 1. exact resume
def _train(rank, world, overrides):
    _deepspeed_env(rank, world)
    os.environ["DMOE_NO_PROGRESS"] = "1"
    cfg = load_config(None, overrides)
    train(cfg, LaunchInfo(rank, world, rank, world, "test"), "cpu", "deepspeed")


RESUME_CASES = [(1, 1), (1, 2), (2, 1), (2, 2), (1, 0)]  # (ep, zero stage); ZeRO 0: dp only


@pytest.mark.parametrize("ep,stage", RESUME_CASES, ids=[f"{'dp2-ep2' if e > 1 else 'dp2'}-zero{z}"
                                                        for e, z in RESUME_CASES])
def test_deepspeed_resume_is_bit_identical(tmp_path, text_dir, ep, stage):  # noqa: F811
    common = [*TINY, f"--data.paths={text_dir}", f"--data.data_dir={tmp_path / 'data'}",
              f"--parallel.ep={ep}", f"--train.zero_stage={stage}"]
    part, again = tmp_path / "part", tmp_path / "again"
    run_ranks(_train, 2, args=([*common, f"--train.run_dir={part}", "--train.save_every=3"],),
              timeout=300)
    step3 = part / "checkpoints" / "step_000003"
    run_ranks(_train, 2, args=([*common, f"--train.run_dir={again}", f"--train.resume={step3}"],),
              timeout=300)
    ref, got = _losses(part), _losses(again)
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)], (got, ref)


# ---------------------------------------------------------------- 2, 3. across engines, layouts
def _cfg(ep, stage, run_dir):
    return tiny_config(1, ep, ["--moe.capacity_factor=null", "--moe.aux_loss_coef=0",
                               f"--train.zero_stage={stage}", f"--train.run_dir={run_dir}"])


def _engine(rank, world, ep, engine_name, stage, run_dir="unused"):
    _deepspeed_env(rank, world)
    cfg = _cfg(ep, stage, run_dir)
    groups = build_process_groups(ParallelLayout(world, tp=1, ep=ep), rank)
    torch.manual_seed(SEED)
    model = parallelize(MoETransformer(cfg), groups)  # float32: what ZeRO's masters hold
    cls = DeepSpeedEngine if engine_name == "deepspeed" else TorchEngine
    return cls(model, cfg, groups), cfg, groups


def _train_step(engine, groups, step):
    rows = ROWS // groups.size("dp")
    d = groups.index("dp")
    x, y = (t[d * rows:(d + 1) * rows] for t in _global_batch(step))
    engine.backward(engine.forward(x, y).loss)
    engine.step(engine.cfg.train.lr)


def _masters_match_module(engine) -> bool:
    """After a DeepSpeed load the module weights are the fp32 masters (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return all(torch.equal(p.detach(), safe_get_full_fp32_param(p).to(p.dtype))
               for p in engine.module.parameters())


def _phase(rank, world, ep, engine_name, stage, load_from, save_to, optimizer=True):
    """Train 2 steps and save (or load), then one more step; full params after it."""
    engine, cfg, groups = _engine(rank, world, ep, engine_name, stage, save_to or "unused")
    matched = None
    if load_from:
        load_checkpoint(engine, groups, load_from, optimizer=optimizer)
        matched = _masters_match_module(engine) if engine_name == "deepspeed" else None
    else:
        for step in range(2):
            _train_step(engine, groups, step)
    saved = save_checkpoint(engine, cfg, groups, step=2) if save_to else None
    _train_step(engine, groups, 2)
    dist.barrier()
    return full_tensors(engine.module, groups, grads=False), saved, matched


def _run(world, ep, engine_name, stage=1, load_from=None, save_to=None, optimizer=True):
    return run_ranks(_phase, world, args=(ep, engine_name, stage, load_from, save_to, optimizer),
                     timeout=300)[0]


def _diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("stage", [1, 2], ids=["zero1", "zero2"])
def test_cross_engine_resume(tmp_path, stage):
    ds = _run(2, 2, "deepspeed", stage, save_to=tmp_path / "ds")
    to_torch = _run(2, 2, "torch", load_from=ds[1])
    no_state = _run(2, 2, "torch", load_from=ds[1], optimizer=False)
    th = _run(2, 2, "torch", save_to=tmp_path / "torch")
    to_ds = _run(2, 2, "deepspeed", stage, load_from=th[1])
    assert to_ds[2] is True
    figures = {"ds->torch": _diff(ds[0], to_torch[0]), "torch->ds": _diff(th[0], to_ds[0]),
               "ds->torch, no optimizer state": _diff(ds[0], no_state[0])}
    print(f"zero{stage} max abs param diff after one more step: {figures}")
    assert figures["ds->torch"] < TOL and figures["torch->ds"] < TOL, figures
    assert figures["ds->torch, no optimizer state"] > 100 * TOL  # the moments did carry over


def test_reshard_deepspeed_ep2_to_ep1(tmp_path):
    a = _run(2, 2, "deepspeed", 2, save_to=tmp_path / "a")
    b = _run(2, 1, "deepspeed", 2, load_from=a[1])
    assert b[2] is True
    worst = _diff(a[0], b[0])
    print(f"DeepSpeed ZeRO 2 ep2 -> ep1 max abs param diff after one more step: {worst:.3g}")
    assert worst < TOL


def test_zero0_bf16_checkpoints_are_refused_before_training():
    from dmoe.config import ConfigError
    from dmoe.train.engines import check_deepspeed

    check_deepspeed(tiny_config(1, 1, ["--train.zero_stage=0", "--train.save_every=10"]))
    check_deepspeed(tiny_config(1, 1, ["--train.zero_stage=1", "--train.precision=bf16",
                                       "--train.save_every=10"]))
    with pytest.raises(ConfigError, match=r"^train.zero_stage \(0\) with train.precision \(bf16\) "
                                          r"and train.save_every \(10\) or train.resume \(''\): "):
        check_deepspeed(tiny_config(1, 1, ["--train.zero_stage=0", "--train.precision=bf16",
                                           "--train.save_every=10"]))
