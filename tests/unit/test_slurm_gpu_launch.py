"""launch/slurm/train.sbatch on GPU clusters: --gpus-per-task documented, MASTER_ADDR
exported by the script itself (a host name, never a nodelist expression), also where
scontrol is missing."""
import os
import subprocess
from pathlib import Path

from dmoe.startup.launchers import first_node

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch/slurm/train.sbatch"


def test_gpus_per_task_is_documented():
    text = SBATCH.read_text()
    assert "##SBATCH --gpus-per-task=1" in text and "export MASTER_ADDR" in text


def _run(tmp_path, scontrol: str | None, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\necho "ADDR=$MASTER_ADDR PORT=$MASTER_PORT"\n')
    (bin_dir / "scontrol").write_text(scontrol or "#!/bin/bash\nexit 127\n")
    (bin_dir / "hostname").write_text("#!/bin/bash\necho batchhost\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MASTER_"))}
    base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="7",
                SLURM_JOB_NODELIST="gpu[07-09]", **env)
    proc = subprocess.run(["bash", str(SBATCH)], env=base, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_master_addr_without_scontrol_is_this_host(tmp_path):
    assert _run(tmp_path, None) == "ADDR=batchhost PORT=29507"


def test_master_addr_from_scontrol_and_nodeaddr(tmp_path):
    fake = ('#!/bin/bash\nif [ "$2" = hostnames ]; then echo gpu07; echo gpu08; '
            'else echo "NodeName=gpu07 NodeAddr=10.0.0.7 State=IDLE"; fi\n')
    assert _run(tmp_path, fake) == "ADDR=10.0.0.7 PORT=29507"  # gpu07 does not resolve here
    assert _run(tmp_path, fake, MASTER_ADDR="head", MASTER_PORT="1234") == "ADDR=head PORT=1234"


def test_first_node_of_a_nodelist():
    assert first_node("gpu[07-09,12],cpu1") == "gpu07"
    assert first_node("node3,node4") == "node3"
    assert first_node("n[1-2]") == "n1"
