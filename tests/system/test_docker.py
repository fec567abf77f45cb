"""dmoe's Docker image built and run for real, with no registry: dockerd started by hand,
a debootstrap'ed Debian base imported as a local image, the image built on it with
--network host, then two containers as two nodes (NNODES=2, one rank each, EP=2, a shared
volume for data and checkpoints) train together through the c10d rendezvous and write a
checkpoint. Everything runs in tests/system/docker_two_nodes.sh; this checks its results.

Needs root and Debian's docker.io and debootstrap (scripts/system-deps.sh installs them).
It takes minutes (the image build dominates), so it has its own marker:
    pytest -m docker tests/system/test_docker.py        # .ci/run runs it as its own stage
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.system, pytest.mark.docker]


def test_two_containers_train_together(tmp_path):
    if os.geteuid() != 0 or not (shutil.which("dockerd") and shutil.which("debootstrap")):
        pytest.skip("needs root, dockerd and debootstrap (scripts/system-deps.sh)")
    work = tmp_path / "docker"
    proc = subprocess.run([str(REPO / "tests/system/docker_two_nodes.sh"), str(work)],
                          capture_output=True, text=True, timeout=1800)
    logs = {p.name: p.read_text()[-4000:] for p in work.glob("*.log")}
    assert proc.returncode == 0, (proc.stderr[-3000:], {k: v[-1500:] for k, v in logs.items()})
    result = dict(line.split("=", 1) for line in (work / "result.env").read_text().split())
    print("docker two-node test timings (s):", result)
    assert result["rc0"] == "0" and result["rc1"] == "0", logs
    run = work / "shared" / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2, summary
    assert summary["val_loss_last"] < summary["val_loss_first"] - 0.3, summary
    # both nodes took part: each container's torchrun ran a worker that joined the world
    for node in ("node0.log", "node1.log"):
        assert "rendezvous c10d" in logs[node] and "Traceback" not in logs[node], logs[node]
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert ckpts and ckpts[-1].name == "step_000012", ckpts
    # expert-parallel shards: each rank (one per container) wrote its own file
    names = {p.name for p in ckpts[-1].iterdir()}
    assert {"rank_00000.safetensors", "rank_00001.safetensors", "manifest.json"} <= names, names
