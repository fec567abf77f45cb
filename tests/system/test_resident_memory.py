"""A 1,000-step one-rank run keeps its resident memory flat (dmoe.startup.allocator: glibc's
mmap threshold fixed, so freed tensors go back to the system instead of piling up in the
heap; and nothing kept per step). A memory bound, not a timing one: the least-squares slope
of RSS over the last 800 steps, sampled from /proc by scripts/rss_run.py."""

import json
import sys

import pytest

from .conftest import TINY, run_cmd

pytestmark = pytest.mark.system

SLOPE_MB_PER_100_STEPS = 2.0  # measured ~0.1-1 on this config; glibc retention showed 10s-100s


def test_rss_flat_over_1000_steps(tmp_path, data_dir):
    args = [
        *TINY,
        "--train.steps=1000",
        "--train.log_every=20",
        "--train.eval_every=100000",
        f"--data.data_dir={data_dir}",
    ]
    proc = run_cmd(
        [sys.executable, "scripts/rss_run.py", "--out", str(tmp_path), "--", *args], timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rss_mb_end"][0] == 1000 and len(result["per_100_steps"]) == 10, result
    assert result["slope_mb_per_100_steps_last_80pct"] < SLOPE_MB_PER_100_STEPS, result
