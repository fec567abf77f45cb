"""Device and backend choice on (faked) CUDA machines: LOCAL_RANK names the GPU dmoe uses,
over-subscription is refused, a GPU job without CUDA is an error unless gloo is asked for."""
import os

import pytest
import torch

from dmoe.startup import process_group as pg
from dmoe.startup.launchers import LaunchInfo


def test_device_index_rules():
    assert pg.choose_device_index(3, 8, 8, env={}) == 3
    # srun --gpus-per-task=1: every task sees one GPU, ordinal 0, whatever its local rank
    assert pg.choose_device_index(1, 2, 1, env={"SLURM_GPUS_PER_TASK": "1"}) == 0
    assert pg.choose_device_index(3, 4, 2, env={"DMOE_GPUS_PER_TASK": "1"}) == 1
    with pytest.raises(RuntimeError, match="2 ranks on this node but 1 visible GPU"):
        pg.choose_device_index(0, 2, 1, env={})  # rank 0 refuses too, not only rank 1
    with pytest.raises(RuntimeError, match="one rank per GPU"):
        pg.choose_device_index(1, 2, 1, env={})


def test_backend_rules(tmp_path):
    assert pg.choose_backend("auto", True, {}) == "nccl"
    assert pg.choose_backend("auto", False, {}, hint="") == "gloo"
    assert pg.choose_backend("gloo", False, {"SLURM_GPUS_PER_TASK": "1"}) == "gloo"
    with pytest.raises(RuntimeError, match="GPU job .SLURM_GPUS_PER_TASK=1"):
        pg.choose_backend("auto", False, {"SLURM_GPUS_PER_TASK": "1"})
    with pytest.raises(RuntimeError, match="parallel.backend=nccl"):
        pg.choose_backend("nccl", False, {}, hint="")
    # the DeepSpeed launcher sets CUDA_VISIBLE_DEVICES on CPU machines too: no hint
    assert pg.gpu_job_hint({"CUDA_VISIBLE_DEVICES": "0,1"}, str(tmp_path / "none")) == ""
    (tmp_path / "nvidia0").touch()
    assert pg.gpu_job_hint({}, str(tmp_path / "nvidia0")).endswith("nvidia0 exists")
    with pytest.raises(RuntimeError, match="nvidia0 exists"):
        pg.choose_backend("auto", False, {}, hint=pg.gpu_job_hint({}, str(tmp_path / "nvidia0")))


@pytest.fixture
def fake_cuda(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(d))
    monkeypatch.setattr(pg.dist, "is_initialized", lambda: True)  # no process group needed
    for k in ("SLURM_GPUS_PER_TASK", "DMOE_GPUS_PER_TASK", "LOCAL_RANK", "RANK", "WORLD_SIZE",
              "MASTER_ADDR", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.setenv(k, "")  # recorded, so what init_distributed exports is undone after
        monkeypatch.delenv(k)
    monkeypatch.setenv("MASTER_PORT", "29999")
    return chosen


def test_local_rank_export_is_the_chosen_ordinal(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("SLURM_GPUS_PER_TASK", "1")
    device = pg.init_distributed(LaunchInfo(3, 4, 1, 2, "slurm"))
    assert device == torch.device("cuda", 0) and fake_cuda == [device]
    assert os.environ["LOCAL_RANK"] == "0"  # not SLURM_LOCALID 1: DeepSpeed would pick GPU 1


def test_oversubscription_refused(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match="4 ranks on this node but 2 visible GPU"):
        pg.init_distributed(LaunchInfo(0, 4, 0, 4, "torchrun"))
    assert fake_cuda == []


def test_eight_ranks_eight_gpus(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert pg.init_distributed(LaunchInfo(13, 16, 5, 8, "torchrun")) == torch.device("cuda", 5)
    assert os.environ["LOCAL_RANK"] == "5"
