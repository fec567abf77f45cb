"""Exact resume through the real training loop: stop after step 3, resume in fresh
processes, and steps 4..6 give bit-identical losses to the uninterrupted run."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dmoe.config import load_config
from dmoe.startup.launchers import LaunchInfo
from dmoe.train.trainer import train
from tests._dist import run_ranks

TINY = [
    "--model.vocab_size=256", "--model.d_model=16", "--model.n_layers=2", "--model.n_heads=2",
    "--model.seq_len=16", "--model.ffn_dim=32", "--moe.num_experts=4", "--moe.expert_ffn_dim=16",
    "--moe.every=1", "--train.steps=6", "--train.micro_batch_size=4", "--train.warmup_steps=2",
    "--train.log_every=1", "--train.eval_every=100", "--train.eval_batches=1", "--train.lr=0.01",
    "--data.val_fraction=0.2",
]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(f"document {i}: " + "the quick brown fox " * (5 + i % 7))
    return root


def _train(rank, world, overrides):
    cfg = load_config(None, overrides)
    train(cfg, LaunchInfo(rank, world, rank, world, "test"), "cpu", "torch")


def _losses(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


# loss-free balancing: the expert bias is training state that must survive the resume
DEEPSEEK = ["--moe.score_func=sigmoid", "--moe.bias_update_rate=0.05", "--moe.num_experts=8",
            "--moe.num_groups=2", "--moe.topk_groups=1", "--moe.num_shared_experts=1",
            "--moe.seq_aux_loss_coef=0.1", "--model.norm=rmsnorm"]


# dropout and router jitter draw from the RNG: the resume must restore every rank's RNG state
NOISY = ["--model.dropout=0.1", "--moe.router_jitter=0.05"]


@pytest.mark.parametrize("ep,sampler,extra", [(1, "random", []), (2, "random", []), (2, "epoch", []),
                                              (2, "random", DEEPSEEK), (2, "random", NOISY)],
                         ids=["ep1", "ep2", "ep2-epoch", "ep2-loss-free-bias", "ep2-dropout-jitter"])
def test_resume_is_bit_identical(tmp_path, text_dir, ep, sampler, extra):
    common = [*TINY, f"--data.paths={text_dir}", f"--data.data_dir={tmp_path / 'data'}",
              f"--parallel.ep={ep}", f"--data.sampler={sampler}", *extra]
    full, part = tmp_path / "full", tmp_path / "part"
    run_ranks(_train, 2, args=([*common, f"--train.run_dir={full}", "--train.save_every=6"],))
    # the interrupted run: saves at steps 3 and 6; resuming from step 3 is "stop at 3"
    run_ranks(_train, 2, args=([*common, f"--train.run_dir={part}", "--train.save_every=3"],))
    ckpts = part / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000006"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000003", "step_000006"]
    step3 = ckpts / "step_000003"
    again = tmp_path / "again"
    run_ranks(_train, 2, args=([*common, f"--train.run_dir={again}", f"--train.resume={step3}",
                                "--train.save_every=6"],))
    ref, got = _losses(full), _losses(again)
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)], (got, ref)
    assert _losses(part) == ref  # saving does not disturb training
    for rank_file in ("rank_00000.safetensors", "rank_00001.safetensors"):  # final state, bit for bit
        a = load_file(full / "checkpoints" / "step_000006" / rank_file)
        b = load_file(again / "checkpoints" / "step_000006" / rank_file)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng/")), rank_file
    if extra is DEEPSEEK:  # the bias moved and was saved (resharded on load if the layout changes)
        saved = load_file(ckpts / "step_000006" / "rank_00000.safetensors")
        assert saved["param/blocks.0.ffn.router.expert_bias"].abs().max() > 0
