"""Atomic save: a kill -9 inside the temp-dir phase leaves the previous checkpoint as
`latest` and loadable; a corrupt checkpoint fails with one line naming the file; failed
loads delete nothing."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dmoe.checkpoint.commit import latest_checkpoint
from dmoe.checkpoint.errors import CheckpointError
from dmoe.checkpoint.load import load_checkpoint
from dmoe.checkpoint.save import save_checkpoint
from dmoe.parallel.layout import ParallelLayout, build_process_groups
from dmoe.parallel.parallelize import parallelize
from dmoe.tools.checkpoint import main as checkpoint_cli
from dmoe.train.engines import TorchEngine
from tests._dist import run_ranks

from .equivalence import batch, build_full_model, tiny_config

REPO = Path(__file__).resolve().parents[2]

SAVER = textwrap.dedent("""
    import sys, time, torch, torch.distributed as dist
    from safetensors.torch import save_file
    from tests.distributed.test_checkpoint_atomic import _engine, _step
    from dmoe.checkpoint import save
    from dmoe.checkpoint.save import save_checkpoint
    run_dir = sys.argv[1]
    dist.init_process_group("gloo", store=dist.FileStore(run_dir + "/store", 1), rank=0, world_size=1)
    cfg, groups, engine = _engine(0, 1, run_dir)
    _step(engine, groups, 0)
    save_checkpoint(engine, cfg, groups, step=1)
    save_file({n: p.detach() for n, p in engine.module.named_parameters()}, run_dir + "/expected.safetensors")
    _step(engine, groups, 1)
    save.commit = lambda *args, **kwargs: time.sleep(120)  # hangs inside the temp dir of step 2 until killed
    save_checkpoint(engine, cfg, groups, step=2)
""")


def _engine(rank, world, run_dir, ep=1):
    cfg = tiny_config(1, ep, [f"--train.run_dir={run_dir}"])
    groups = build_process_groups(ParallelLayout(world, ep=ep), rank)
    return cfg, groups, TorchEngine(parallelize(build_full_model(cfg), groups), cfg, groups)


def _step(engine, groups, step):
    engine.backward(engine.forward(*batch(step, groups.index("dp"))).loss)
    engine.step(engine.cfg.train.lr)


def _load_then_save(rank, world, run_dir):
    cfg, groups, engine = _engine(rank, world, run_dir)
    path = latest_checkpoint(Path(run_dir) / "checkpoints")
    manifest = load_checkpoint(engine, groups, path)
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    save_checkpoint(engine, cfg, groups, step=manifest["step"] + 1)
    return path.name, params


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], cwd=REPO, env=env)
    partial = tmp_path / "checkpoints" / ".tmp-step_000002" / "rank_00000.safetensors"
    deadline = time.time() + 90
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert partial.exists(), "the saver never reached the temp-dir phase of step 2"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000001"
    assert not (ckpts / "step_000002").exists()
    name, params = run_ranks(_load_then_save, 1, args=(str(tmp_path),))[0]
    assert name == "step_000001"
    expected = load_file(tmp_path / "expected.safetensors")
    assert all(torch.equal(params[n], expected[n]) for n in expected)
    # the next save cleans the killed save's temp dir and moves `latest`
    assert not (ckpts / ".tmp-step_000002").exists()
    assert (ckpts / "latest").read_text() == "step_000002"


def _save(rank, world, run_dir):
    cfg, groups, engine = _engine(rank, world, run_dir, ep=2)
    _step(engine, groups, 0)
    return str(save_checkpoint(engine, cfg, groups, step=1))


def _try_load(rank, world, path):
    _, groups, engine = _engine(rank, world, "unused", ep=2)
    try:
        load_checkpoint(engine, groups, path)
    except CheckpointError as err:
        return str(err)
    return None


@pytest.fixture
def saved(tmp_path):
    return Path(run_ranks(_save, 2, args=(str(tmp_path),))[0])


@pytest.mark.parametrize("fault", ["flipped byte", "missing file", "truncated"])
def test_corrupt_checkpoint_fails_with_one_line(saved, fault, capsys, tmp_path):
    victim = saved / "rank_00001.safetensors"
    data = bytearray(victim.read_bytes())
    if fault == "missing file":
        victim.unlink()
    elif fault == "truncated":
        victim.write_bytes(data[:-7])
    else:
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(data)
    before = sorted(p.name for p in saved.iterdir())
    errors = run_ranks(_try_load, 2, args=(str(saved),))
    assert errors[0] == errors[1] and errors[0] is not None  # every rank fails alike
    word = {"flipped byte": "sha256", "missing file": "missing", "truncated": "bytes"}[fault]
    assert "rank_00001.safetensors" in errors[0] and word in errors[0] and "\n" not in errors[0]
    assert checkpoint_cli(["export", str(saved), str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("checkpoint error:") and word in err
    assert sorted(p.name for p in saved.iterdir()) == before  # nothing deleted
