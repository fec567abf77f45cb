"""Training under Slurm: srun and the sbatch script on a one-host cluster of two virtual nodes.

tests/system/slurm_cluster.sh brings the cluster up (munged, slurmctld, slurmd for vn1 and vn2)
once per session. Slurm must be installed (.ci/run installs it): without it these tests fail.
"""
import json
import re
import shutil
import subprocess
import sys

import pytest

from .conftest import REPO, TINY, free_port, run_cmd
from .test_launchers import check_run

pytestmark = pytest.mark.system

CLUSTER = REPO / "tests" / "system" / "slurm_cluster.sh"
NEEDED = ("munged", "mungekey", "slurmctld", "slurmd", "srun", "sbatch", "sinfo", "scontrol")


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory):
    missing = [b for b in NEEDED if shutil.which(b) is None]
    assert not missing, (f"Slurm is not installed (missing {missing}); "
                         ".ci/run installs slurmctld slurmd slurm-client munge")
    cluster_dir = tmp_path_factory.mktemp("slurm") / "cluster"
    up = subprocess.run([str(CLUSTER), "up", str(cluster_dir)], capture_output=True, text=True,
                        timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield {"SLURM_CONF": str(cluster_dir / "slurm.conf")}
    finally:
        subprocess.run([str(CLUSTER), "down", str(cluster_dir)], capture_output=True, timeout=60)


def job_env(slurm_env):
    # MASTER_ADDR is left to dmoe (vn1's NodeAddr); a free port instead of the job-id default,
    # which other runs on a shared machine may hold
    return dict(slurm_env, MASTER_PORT=str(free_port()))


def check_slurm_run(run_dir):
    check_run(run_dir, 2, "torch")
    assert json.loads((run_dir / "summary.json").read_text())["launcher"] == "slurm"


def test_srun_two_virtual_nodes(tmp_path, data_dir, slurm_env):
    proc = run_cmd(["srun", "-N2", "-n2", "--time=5", "--kill-on-bad-exit=1", sys.executable,
                    "launch/train.py", *TINY, f"--data.data_dir={data_dir}",
                    f"--train.run_dir={tmp_path}"], env_extra=job_env(slurm_env))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    check_slurm_run(tmp_path)


def test_sbatch_script_two_virtual_nodes(tmp_path, data_dir, slurm_env):
    out = tmp_path / "job.out"
    proc = run_cmd(["sbatch", "--wait", "-N2", "--ntasks-per-node=1", "--time=5", f"--output={out}",
                    "launch/slurm/train.sbatch", *TINY, f"--data.data_dir={data_dir}",
                    f"--train.run_dir={tmp_path / 'run'}"], env_extra=job_env(slurm_env))
    log = out.read_text() if out.exists() else "(no job output)"
    assert proc.returncode == 0, (proc.stdout + proc.stderr + log)[-3000:]
    check_slurm_run(tmp_path / "run")


def _losses(run_dir):
    """{step: loss} from metrics.jsonl; a step logged twice (before a requeue and again after
    the resume) keeps its last value."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}


def _wait(cond, timeout, what):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_sbatch_requeue_resumes_from_latest_checkpoint(tmp_path, data_dir, slurm_env):
    """scontrol requeue of a running train.sbatch job (as preemption or a node failure would):
    the job starts again with SLURM_RESTART_COUNT=1, resumes from its latest checkpoint by
    itself, and every logged loss equals an uninterrupted run's."""
    args = [*TINY, "--train.steps=16", "--train.save_every=4", "--train.log_every=1",
            f"--data.data_dir={data_dir}"]
    sbatch = ["sbatch", "-N2", "--ntasks-per-node=1", "--time=5"]
    ref = run_cmd([*sbatch, "--wait", f"--output={tmp_path / 'ref.out'}",
                   "launch/slurm/train.sbatch", *args, f"--train.run_dir={tmp_path / 'ref'}"],
                  env_extra=job_env(slurm_env))
    assert ref.returncode == 0, (ref.stdout + ref.stderr)[-3000:]

    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    env = job_env(slurm_env)
    sub = run_cmd([*sbatch, "--parsable", f"--output={out}", "launch/slurm/train.sbatch", *args,
                   f"--train.run_dir={run_dir}"], env_extra=env)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    try:
        _wait(lambda: (run_dir / "checkpoints" / "latest").exists(), 240, "the first checkpoint")
        assert run_cmd(["scontrol", "requeue", job], env_extra=env).returncode == 0
        # a requeued job is held until now + 120 s (Slurm's BeginTime): let it start at once
        def state():
            return run_cmd(["squeue", "-h", "-j", job, "-o", "%T"], env_extra=env).stdout.strip()

        _wait(lambda: state() == "PENDING", 60, "the job to be requeued")
        run_cmd(["scontrol", "update", f"jobid={job}", "StartTime=now"], env_extra=env)
        _wait(lambda: not state(), 300, "the requeued job to finish")
    finally:
        run_cmd(["scancel", job], env_extra=env)
    log = out.read_text()
    assert "elastic restart 1 (SLURM_RESTART_COUNT): train.resume=auto" in log, log[-3000:]
    resumed = re.search(r"resumed from \S+step_(\d+)", log)
    assert resumed and 4 <= int(resumed.group(1)) < 16, log[-3000:]
    assert (run_dir / "summary.json").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000016"
    expected, got = _losses(tmp_path / "ref"), _losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 17))
    assert got == expected  # bit for bit, the steps after the resumed checkpoint included
