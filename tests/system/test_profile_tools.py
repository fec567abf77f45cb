"""`dmoe profile`, `dmoe tune-capacity` and `dmoe bench-comm` on the tiny config: the reports exist."""
import json
import sys

import pytest
import yaml

from .conftest import BIN, TINY, run_cmd

pytestmark = pytest.mark.system
DMOE = [str(BIN / "dmoe")] if (BIN / "dmoe").exists() else [sys.executable, "-m", "dmoe.cli"]


def test_profile_two_ranks_ep(tmp_path, data_dir):
    proc = run_cmd([*DMOE, "profile", "--nproc", "2", "--parallel.ep=2", "--steps", "3", "--warmup", "1",
                    "--out", str(tmp_path), *TINY, f"--data.data_dir={data_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a2a ms" in proc.stdout and "moe1" in proc.stdout and "no GPU" in proc.stdout
    records = [json.loads(x) for x in (tmp_path / "profile.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4]
    for r in records:
        assert r["a2a_s"] > 0 and r["wait_s"] > 0 and len(r["rank_step_s"]) == 2
        assert len(r["layers"]) == 2 and all(lay["a2a_bytes"] > 0 for lay in r["layers"])
    trace = json.loads((tmp_path / "trace_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"moe0/route", "moe0/dispatch", "moe0/experts", "moe0/combine"} <= names
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "expert load" in html
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_tune_capacity_single_rank(tmp_path, data_dir):
    proc = run_cmd([*DMOE, "tune-capacity", "--steps", "4", "--timed-factors", "1.0,2.0", "--timed-steps", "2",
                    "--eval-batches", "2", "--target-drop", "0.05", "--out", str(tmp_path), *TINY,
                    f"--data.data_dir={data_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recommended moe.capacity_factor" in proc.stdout and "eval: drop" in proc.stdout
    res = json.loads((tmp_path / "tune.json").read_text())
    assert res["drop"] == sorted(res["drop"], reverse=True)  # more capacity, fewer drops
    override = yaml.safe_load((tmp_path / "capacity.yaml").read_text())
    assert override["moe"]["capacity_factor"] == res["recommended"]
    html = (tmp_path / "report.html").read_text()
    assert "drop fraction vs capacity factor" in html and html.count("data:image/png;base64,") >= 3
    assert "Timed runs: default + " in html and "a fresh model" in html


def test_bench_comm_two_ranks(tmp_path):
    proc = run_cmd([*DMOE, "bench-comm", "--nproc", "2", "--max-bytes", "64K", "--iters", "2",
                    "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_comm.json").read_text())["rows"]
    assert [r["bytes"] for r in rows] == [4096, 16384, 65536]
    assert all(abs(r["busbw_gbps"] - r["algbw_gbps"] / 2) < 1e-9 for r in rows)
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 2


def test_profile_a_trained_checkpoint(tmp_path, data_dir):
    """--train.resume: routing and timings of a trained model, continuing after its step."""
    run_dir = tmp_path / "run"
    train = run_cmd([sys.executable, "launch/train.py", *TINY, f"--data.data_dir={data_dir}",
                     f"--train.run_dir={run_dir}", "--train.save_every=12"])
    assert train.returncode == 0, train.stderr[-3000:]
    proc = run_cmd([*DMOE, "profile", "--steps", "2", "--warmup", "1", "--out", str(tmp_path / "p"),
                    *TINY, f"--data.data_dir={data_dir}", f"--train.run_dir={run_dir}",
                    "--train.resume=auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "p" / "profile.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [14, 15]  # resumed at 12, one warmup step
