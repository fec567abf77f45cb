import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

TINY = [
    "--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2", "--model.seq_len=32",
    "--model.ffn_dim=64", "--moe.num_experts=4", "--moe.expert_ffn_dim=32", "--moe.every=1",
    "--train.steps=12", "--train.micro_batch_size=8", "--train.warmup_steps=1",
    "--train.log_every=4", "--train.eval_every=6", "--train.eval_batches=2", "--train.lr=0.01",
    "--data.max_corpus_mb=0.5",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data") / "byte")


def run_cmd(cmd, timeout=300, env_extra=None):
    env = dict(os.environ, DMOE_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def run_deepspeed(nproc: int, train_args: list[str], timeout=300):
    """`deepspeed --num_gpus N launch/train.py ARGS` on a free port; removes the /dev/shm
    buffers the launcher's ranks leave behind (~66 MB each, never freed by DeepSpeed)."""
    import glob

    port = free_port()
    try:
        return run_cmd([str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port),
                        "launch/train.py", *train_args], timeout=timeout)
    finally:
        for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
            os.remove(f)
