"""A kill -9 at each point of the commit sequence leaves a loadable checkpoint that `latest`
(or the directory scan) finds; pruning keeps the newest commits, not the highest steps;
a fresh start in a run dir that holds checkpoints is refused (or, with train.overwrite,
moves them aside).

The kills are injected by replacing one function of dmoe.checkpoint in a subprocess with
one that kills its own process (SIGKILL: no handler, no cleanup runs)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dmoe.checkpoint.commit import commit, latest_checkpoint, remove_stale
from dmoe.checkpoint.errors import CheckpointError
from dmoe.checkpoint.load import load_checkpoint
from dmoe.checkpoint.save import save_checkpoint
from dmoe.config import load_config
from dmoe.startup.launchers import LaunchInfo
from dmoe.train.trainer import train
from tests._dist import run_ranks

from .test_checkpoint_atomic import _engine
from .test_checkpoint_resume import TINY, text_dir  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]

# argv: run_dir, kill point. Saves steps 1 and 2, arms the kill point, then saves step 3
# (or step 2 again for the resave_* points) and is killed inside that save.
KILLER = textwrap.dedent("""
    import os, signal, sys, torch.distributed as dist
    from tests.distributed.test_checkpoint_atomic import _engine, _step
    from dmoe.checkpoint import commit, save
    from dmoe.checkpoint.save import save_checkpoint
    run_dir, point = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", store=dist.FileStore(run_dir + "/store", 1), rank=0, world_size=1)
    cfg, groups, engine = _engine(0, 1, run_dir)
    cfg.train.keep_last = 2
    for step in (1, 2):
        _step(engine, groups, step)
        save_checkpoint(engine, cfg, groups, step=step)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def kill_when(real, test, after=False):
        def wrapped(*args, **kwargs):
            if test(*args) and not after:
                die()
            out = real(*args, **kwargs)
            if test(*args) and after:
                die()
            return out
        return wrapped

    rename = commit._rename
    if point == "rank_file":
        save.write_tensors = die
    elif point == "manifest":
        commit.write_durable = kill_when(commit.write_durable, lambda p, d: p.name == "manifest.json")
    elif point == "rename":
        commit._rename = die
    elif point == "after_rename":
        commit._rename = kill_when(rename, lambda s, d: True, after=True)
    elif point in ("latest", "resave_latest"):
        commit.write_atomic = die
    elif point == "prune":
        commit.prune = die
    elif point == "resave_aside":  # the old step 2 renamed aside, the new one not yet in place
        commit._rename = kill_when(rename, lambda s, d: d.name.startswith(".prev-"), after=True)
    elif point == "resave_swap":  # the new step 2 in place, `latest` rewritten, aside not deleted
        commit.shutil.rmtree = kill_when(commit.shutil.rmtree, lambda p, *a: p.exists())
    _step(engine, groups, 3)
    save_checkpoint(engine, cfg, groups, step=2 if point.startswith("resave") else 3)
    sys.exit(3)  # not killed: the kill point was never reached
""")

# point: (the directory latest_checkpoint returns, the step it holds)
EXPECT = {
    "rank_file": ("step_000002", 2), "manifest": ("step_000002", 2), "rename": ("step_000002", 2),
    "after_rename": ("step_000002", 2), "latest": ("step_000002", 2), "prune": ("step_000003", 3),
    "resave_aside": (".prev-step_000002", 2), "resave_swap": ("step_000002", 2),
    "resave_latest": ("step_000002", 2),
}


def _load_then_save(rank, world, run_dir):
    cfg, groups, engine = _engine(rank, world, run_dir)
    path = latest_checkpoint(Path(run_dir) / "checkpoints")
    manifest = load_checkpoint(engine, groups, path)
    save_checkpoint(engine, cfg, groups, step=manifest["step"] + 10)
    return path.name, manifest["step"], manifest["seq"]


@pytest.mark.parametrize("point", list(EXPECT))
def test_kill_inside_commit_leaves_a_loadable_checkpoint(tmp_path, point):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path), point], cwd=REPO, env=env,
                          timeout=240)
    assert proc.returncode == -9, f"the saver was not killed at {point} (rc {proc.returncode})"
    ckpts = tmp_path / "checkpoints"
    aside_left = (ckpts / ".prev-step_000002").is_dir()
    assert aside_left == (point in ("resave_aside", "resave_swap", "resave_latest")), point
    assert (ckpts / "step_000002").is_dir() == (point != "resave_aside")
    name, step, seq = run_ranks(_load_then_save, 1, args=(str(tmp_path),))[0]
    assert (name, step) == EXPECT[point]
    # the next save cleans up after the killed one and moves `latest` on
    left = sorted(p.name for p in ckpts.iterdir())
    assert not [n for n in left if n.startswith((".tmp-", ".prev-"))], left
    assert (ckpts / "latest").read_text() == f"step_{step + 10:06d}"
    assert (ckpts / "step_000002" / "manifest.json").is_file()  # never lost, whatever the kill


def _fake_tmp(root: Path, step: int) -> Path:
    tmp = root / f".tmp-step_{step:06d}"
    tmp.mkdir(parents=True)
    (tmp / "rank_00000.safetensors").write_bytes(b"x")
    return tmp


def _commit(root: Path, step: int, keep_last: int) -> Path:
    final = root / f"step_{step:06d}"
    return commit(_fake_tmp(root, step), final, {"format": "x", "step": step}, "", keep_last=keep_last)


def test_prune_keeps_the_newest_commits_not_the_highest_steps(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (30, 40):
        _commit(root, step, keep_last=2)
    _commit(root, 10, keep_last=2)  # a run resumed from an earlier step saves step 10
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000010", "step_000040"]
    assert (root / "latest").read_text() == "step_000010"
    _commit(root, 20, keep_last=1)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000020"]
    seqs = json.loads((root / "step_000020" / "manifest.json").read_text())["seq"]
    assert seqs == 4


def test_prune_never_deletes_what_latest_names(tmp_path):
    root = tmp_path / "checkpoints"
    _commit(root, 1, keep_last=0)
    _commit(root, 2, keep_last=0)
    (root / "latest").write_text("step_000001")  # e.g. set by hand to roll back
    commit(_fake_tmp(root, 3), root / "step_000003", {"format": "x", "step": 3}, "",
           move_latest=False)
    from dmoe.checkpoint.commit import prune

    prune(root, 1)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000001", "step_000003"]


def test_resave_killed_between_renames_is_restored(tmp_path):
    root = tmp_path / "checkpoints"
    _commit(root, 5, keep_last=0)
    (root / "step_000005").rename(root / ".prev-step_000005")  # the state after the first rename
    assert latest_checkpoint(root) == root / ".prev-step_000005"
    remove_stale(root)  # what the next save does first
    assert latest_checkpoint(root) == root / "step_000005"
    assert not (root / ".prev-step_000005").exists()


# ---------------------------------------------------------------- the 10-vs-40 scenario
def _train(rank, world, overrides):
    train(load_config(None, overrides), LaunchInfo(rank, world, rank, world, "test"), "cpu", "torch")


def _train_error(rank, world, overrides):
    try:
        _train(rank, world, overrides)
    except CheckpointError as err:
        return str(err)
    return None


def test_fresh_run_beside_a_longer_one(tmp_path, text_dir):  # noqa: F811
    run = tmp_path / "run"
    common = [*TINY, f"--data.paths={text_dir}", f"--data.data_dir={tmp_path / 'data'}",
              f"--train.run_dir={run}", "--train.keep_last=1"]
    long = [a for a in common if not a.startswith("--train.steps")] + ["--train.steps=8"]
    run_ranks(_train, 1, args=([*long, "--train.save_every=4"],))
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000008"
    # a fresh 4-step run in the same dir: refused with one line, nothing touched
    err = run_ranks(_train_error, 1, args=([*common, "--train.steps=4", "--train.save_every=4"],))[0]
    assert err == (f"train.run_dir {run} already holds checkpoints up to step 8: resume with "
                   "--train.resume=auto, or choose another run dir / --train.overwrite=true")
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000008"]
    # with train.overwrite: the old checkpoints are moved aside, the new one is kept
    run_ranks(_train, 1, args=([*common, "--train.steps=4", "--train.save_every=4",
                                "--train.overwrite=true"],))
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000004"]
    assert (ckpts / "latest").read_text() == "step_000004"
    aside = [p for p in run.iterdir() if p.name.startswith("checkpoints.replaced-")]
    assert len(aside) == 1 and (aside[0] / "step_000008" / "manifest.json").is_file()
    # resume=auto continues the new run, and pruning keeps its newest commit
    run_ranks(_train, 1, args=([*common, "--train.steps=6", "--train.save_every=2",
                                "--train.resume=auto"],))
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000006"]
