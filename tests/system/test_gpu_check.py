"""scripts/gpu_check.sh in CPU mode (what CI can run of it): the CPU-compatible parts pass,
the CUDA-only ones are skipped as "no GPU", one JSON summary is written."""
import json
import os
import subprocess

import pytest

from .conftest import REPO

pytestmark = pytest.mark.system


def test_gpu_check_cpu_mode(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(["scripts/gpu_check.sh", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["ok"] and not summary["env"]["cuda_available"]
    parts = summary["parts"]
    assert {n: parts[n]["status"] for n in parts} == {
        "moe_layer": "pass", "train": "pass", "deepspeed": "skipped", "profile": "skipped",
        "bench": "skipped"}
    assert all(parts[n]["reason"] == "no GPU" for n in ("deepspeed", "profile", "bench"))
    cases = {c["case"]: c for c in parts["moe_layer"]["cases"]}
    assert set(cases) == {"local_fp32", "a2a_ep1_fp32", "grouped_mm_fp32"}
    assert all(c["dmoe_host_syncs"] == 1 for c in cases.values())
    assert parts["train"]["resumed"] and len(parts["train"]["checkpoints"]) == 2
