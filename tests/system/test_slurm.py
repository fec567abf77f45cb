"""Training under Slurm: srun and the sbatch script on a one-host cluster of two virtual nodes.

tests/system/slurm_cluster.sh brings the cluster up (munged, slurmctld, slurmd for vn1 and vn2)
once per session. Slurm must be installed (.ci/run installs it): without it these tests fail.
"""
import json
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
