"""A non-finite loss is caught at the step it appears, on every rank alike (even when only
one rank sees it): train.nonfinite=stop stops with one line and saves nothing of that
state; skip skips the optimizer step, at most train.max_skipped_steps times. Perplexity of
a huge loss is inf, not a traceback."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmoe.config import load_config
from dmoe.startup.launchers import LaunchInfo
from dmoe.train.nonfinite import NonFiniteError, safe_exp
from dmoe.train.trainer import train
from tests._dist import run_ranks

from .test_checkpoint_resume import TINY, text_dir  # noqa: F401  (fixture)
from .test_deepspeed_equivalence import _deepspeed_env

REPO = Path(__file__).resolve().parents[2]


def _poison(engine_cls, steps, ranks, rank):
    """The loss becomes NaN at these (1-based) training micro-steps on these ranks."""
    real, calls = engine_cls.forward, {"n": 0}

    def forward(self, x, y):
        out = real(self, x, y)
        if self.module.training:
            calls["n"] += 1
            if calls["n"] in steps and rank in ranks:
                out.loss = out.loss * float("nan")
        return out
    engine_cls.forward = forward


def _train(rank, world, overrides, engine="torch", poison=((), ())):
    from dmoe.train.engines import DeepSpeedEngine, TorchEngine

    if engine == "deepspeed":
        _deepspeed_env(rank, world)
    _poison(DeepSpeedEngine if engine == "deepspeed" else TorchEngine, *poison, rank)
    os.environ["DMOE_NO_PROGRESS"] = "1"
    try:
        train(load_config(None, overrides), LaunchInfo(rank, world, rank, world, "test"), "cpu", engine)
    except NonFiniteError as err:
        return str(err)
    return None


def _common(tmp_path, text_dir):  # noqa: F811
    return [*TINY, f"--data.paths={text_dir}", f"--data.data_dir={tmp_path / 'data'}",
            f"--train.run_dir={tmp_path / 'run'}", "--train.save_every=1", "--train.keep_last=0"]


def test_stop_on_one_ranks_nan_stops_every_rank_unsaved(tmp_path, text_dir):  # noqa: F811
    errors = run_ranks(_train, 2, args=(_common(tmp_path, text_dir), "torch", ({3}, {1})))
    assert errors[0] == errors[1] == (
        "step 3: non-finite loss and grad_norm (engine torch); training stopped (train.nonfinite=stop), "
        "nothing of this state saved; lower train.lr or check the data")
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000002"
    assert not (ckpts / "step_000003").exists()


def test_skip_skips_the_optimizer_step_then_stops_past_the_bound(tmp_path, text_dir):  # noqa: F811
    common = [*_common(tmp_path, text_dir), "--train.nonfinite=skip", "--train.max_skipped_steps=2"]
    assert run_ranks(_train, 1, args=(common, "torch", ({2, 4}, {0})))[0] is None
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000006"
    from safetensors.torch import load_file

    # a skipped step changes no parameter: step 2's checkpoint equals step 1's
    one, two = (load_file(ckpts / f"step_00000{s}" / "rank_00000.safetensors") for s in (1, 2))
    params = [k for k in one if k.startswith("param/")]
    assert params and all(one[k].equal(two[k]) for k in params)
    assert all(v.isfinite().all() for k, v in load_file(ckpts / "step_000006" / "rank_00000.safetensors").items()
               if k.startswith("param/"))
    # a third non-finite step is one too many
    again = [a.replace(str(tmp_path / "run"), str(tmp_path / "run2")) for a in common]
    err = run_ranks(_train, 1, args=(again, "torch", ({2, 3, 5}, {0})))[0]
    assert err.startswith("step 5: non-finite loss and grad_norm (engine torch); training stopped after 2 "
                          "skipped steps (train.max_skipped_steps=2)")


def test_deepspeed_stop(tmp_path, text_dir):  # noqa: F811
    errors = run_ranks(_train, 2, args=(_common(tmp_path, text_dir), "deepspeed", ({3}, {0})),
                       timeout=300)
    assert errors[0] == errors[1] and errors[0].startswith("step 3: non-finite loss")
    assert "(engine deepspeed)" in errors[0]
    assert not (tmp_path / "run" / "checkpoints" / "step_000003").exists()


def test_huge_learning_rate_stops_with_one_line(tmp_path, text_dir):  # noqa: F811
    env = dict(os.environ, DMOE_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "launch/train.py", *_common(tmp_path, text_dir),
                           "--train.lr=1e30", "--train.steps=20", "--train.warmup_steps=0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("training stopped: step ") and "non-finite" in lines[-1], lines[-3:]
    assert "Traceback" not in proc.stderr
    step = int(lines[-1].split()[3].rstrip(":"))
    assert not (tmp_path / "run" / "checkpoints" / f"step_{step:06d}").exists()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["val_loss"]) for r in records if r["kind"] == "eval")


@pytest.mark.parametrize("x,want", [(1.0, math.e), (1e6, math.inf), (float("inf"), math.inf)])
def test_safe_exp(x, want):
    assert safe_exp(x) == want
    assert math.isnan(safe_exp(float("nan")))
