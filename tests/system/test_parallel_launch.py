"""TP x EP x DP end to end: 4 ranks, tp 2, ep 2 (dp 2), through torchrun (torch engine) and the
deepspeed launcher (DeepSpeed engine, ZeRO 1); the tiny model must learn (val loss falls)."""

import pytest

from .conftest import BIN, TINY, free_port, run_cmd, run_deepspeed
from .test_launchers import check_run

pytestmark = pytest.mark.system

PARALLEL = ["--parallel.tp=2", "--parallel.ep=2"]


def test_torchrun_tp2_ep2(tmp_path, data_dir):
    proc = run_cmd([str(BIN / "torchrun"), "--nproc_per_node", "4",
                    "--master_port", str(free_port()), "launch/train.py", *TINY, *PARALLEL,
                    f"--data.data_dir={data_dir}", f"--train.run_dir={tmp_path}"], timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    check_run(tmp_path, 4, "torch")


def test_deepspeed_tp2_ep2(tmp_path, data_dir):
    proc = run_deepspeed(4, [*TINY, *PARALLEL, f"--data.data_dir={data_dir}",
                             f"--train.run_dir={tmp_path}", "--train.zero_stage=1"], timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    check_run(tmp_path, 4, "deepspeed")


def test_deepspeed_refuses_zero3_with_one_line(tmp_path):
    proc = run_deepspeed(2, [*TINY, "--parallel.ep=2", "--train.zero_stage=3",
                             f"--train.run_dir={tmp_path}"])
    assert proc.returncode != 0
    line = "config error: train.zero_stage (3) must be 0, 1 or 2: DeepSpeed does not support"
    assert line in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "summary.json").exists()
