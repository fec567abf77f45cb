"""An imported HF model trains on through the real launchers: `dmoe import`, then
launch/train.py with --train.resume=RUN_DIR under another layout (ep2 on the plain torch
engine via torchrun, ep2 on DeepSpeed ZeRO 1): the params-only checkpoint is resharded on
load, AdamW starts fresh, and the run saves its own checkpoint in RUN_DIR."""
import json

import pytest

from .conftest import BIN, free_port, run_cmd, run_deepspeed

pytest.importorskip("transformers")
pytestmark = pytest.mark.system

SHORT = ["--train.steps=4", "--train.save_every=4", "--train.log_every=2", "--train.eval_every=2",
         "--train.eval_batches=1", "--train.micro_batch_size=2", "--model.seq_len=16",
         "--data.max_corpus_mb=0.5"]


def _imported(tmp_path):
    from tests.hf_models import save_tiny

    save_tiny("mixtral", tmp_path / "hf", vocab_size=256)  # bytes: dmoe's byte tokenizer
    run = tmp_path / "run"
    proc = run_cmd([str(BIN / "dmoe"), "import", str(tmp_path / "hf"), str(run)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def _check(proc, run, engine):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    words = " ".join(out.split())  # rich wraps log lines
    assert "resumed from" in words and "resharded; RNG states not restored" in words
    manifest = json.loads((run / "checkpoints" / "step_000004" / "manifest.json").read_text())
    assert manifest["layout"]["ep"] == 2 and manifest["engine"] == engine
    assert (run / "checkpoints" / "latest").read_text() == "step_000004"
    assert {"param", "exp_avg", "exp_avg_sq", "step"} <= set(
        next(iter(manifest["tensors"].values()))["states"])


def test_torchrun_ep2_resumes_an_import(tmp_path, data_dir):
    run = _imported(tmp_path)
    proc = run_cmd([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                    "launch/train.py", "--config", str(run / "config.yaml"), f"--train.resume={run}",
                    "--parallel.ep=2", f"--data.data_dir={data_dir}", *SHORT], timeout=600)
    _check(proc, run, "torch")


def test_deepspeed_ep2_resumes_an_import(tmp_path, data_dir):
    run = _imported(tmp_path)
    proc = run_deepspeed(2, ["--config", str(run / "config.yaml"), f"--train.resume={run}",
                             "--parallel.ep=2", f"--data.data_dir={data_dir}",
                             "--train.zero_stage=1", *SHORT], timeout=600)
    _check(proc, run, "deepspeed")
