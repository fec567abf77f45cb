"""The training loop's metrics through real runs: per-layer figures in TensorBoard and JSONL,
all-to-all time of an EP=2 run, MFU and peak memory present, and the series behaviour of a
second run in the same run dir (resume continues, a fresh start sets the old series aside),
and the W&B sink with a fake `wandb` module."""
import json
import sys
import types
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dmoe.config import load_config
from dmoe.startup.launchers import LaunchInfo
from dmoe.train.trainer import train
from tests._dist import run_ranks

TINY = [
    "--model.vocab_size=256", "--model.d_model=16", "--model.n_layers=2", "--model.n_heads=2",
    "--model.seq_len=16", "--model.ffn_dim=32", "--moe.num_experts=4", "--moe.expert_ffn_dim=16",
    "--moe.every=1", "--train.steps=4", "--train.micro_batch_size=4", "--train.warmup_steps=1",
    "--train.log_every=2", "--train.eval_every=100", "--train.eval_batches=1", "--train.lr=0.01",
    "--data.val_fraction=0.2", "--train.peak_tflops=0.001",
]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    for i in range(20):
        (root / f"doc{i:02d}.txt").write_text(f"document {i}: " + "the quick brown fox " * (5 + i % 7))
    return root


def _train(rank, world, overrides):
    cfg = load_config(None, overrides)
    train(cfg, LaunchInfo(rank, world, rank, world, "test"), "cpu", "torch")


def _records(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_ep2_run_logs_per_layer_figures_and_a2a_time(tmp_path, text_dir):
    run = tmp_path / "run"
    run_ranks(_train, 2, args=([*TINY, f"--data.paths={text_dir}", f"--data.data_dir={tmp_path / 'data'}",
                                f"--train.run_dir={run}", "--parallel.ep=2"],))
    records = _records(run)
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert len(r["expert_load_per_layer"]) == 2 and all(len(x) == 4 for x in r["expert_load_per_layer"])
        # every token routes top_k=2 assignments per layer: 2 ranks x 4 x 16 tokens x 2
        assert [sum(x) for x in r["expert_load_per_layer"]] == [256, 256]
        assert len(r["drop_frac_per_layer"]) == 2 and len(r["dead_experts_per_layer"]) == 2
        assert r["a2a_ms"] > 0 and r["a2a_ms_max"] >= r["a2a_ms"]
        assert len(r["a2a_ms_per_layer"]) == 2 and all(x > 0 for x in r["a2a_ms_per_layer"])
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 10
        assert r["mfu"] > 0  # peak_tflops=0.001: a tiny peak, so a non-zero ratio
    acc = _events(run)
    tags = acc.Tags()
    for i in (0, 1):
        assert f"train/drop_frac/moe{i}" in tags["scalars"] and f"train/a2a_ms/moe{i}" in tags["scalars"]
        assert f"train/dead_experts/moe{i}" in tags["scalars"]
        assert f"train/expert_load/moe{i}" in tags["histograms"]
    assert {"train/a2a_ms", "train/mfu", "train/step_ms", "train/peak_rss_mib"} <= set(tags["scalars"])
    # the histogram of layer 1 at step 4 counts that layer's assignments, not both layers'
    hist = next(h for h in acc.Histograms("train/expert_load/moe1") if h.step == 4)
    assert hist.histogram_value.num == 256
    assert [e.step for e in acc.Scalars("train/drop_frac/moe0")] == [2, 4]


def test_resume_continues_fresh_start_sets_aside(tmp_path, text_dir):
    run = tmp_path / "run"
    common = [*TINY, f"--data.paths={text_dir}", f"--data.data_dir={tmp_path / 'data'}",
              f"--train.run_dir={run}", "--train.log_every=1"]
    run_ranks(_train, 1, args=([*common, "--train.save_every=2"],))  # steps 1-4, saves 2 and 4
    ckpt2 = run / "checkpoints" / "step_000002"
    # resume from step 2 (as if the run had stopped there): the series continues
    run_ranks(_train, 1, args=([*common, f"--train.resume={ckpt2}", "--train.save_every=0"],))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    marker = [i for i, r in enumerate(lines) if r["kind"] == "resumed_from"]
    assert len(marker) == 1 and lines[marker[0]]["step"] == 2
    assert lines[marker[0]]["checkpoint"] == str(ckpt2)
    after = [r["step"] for r in lines[marker[0] + 1:] if r["kind"] == "train"]
    assert after == [3, 4]
    # TensorBoard: one series per tag, steps 1..4 once each (purge_step hid the first run's 3, 4)
    assert [e.step for e in _events(run).Scalars("train/loss")] == [1, 2, 3, 4]
    # a fresh start (train.overwrite): the old metrics and tensorboard move aside
    run_ranks(_train, 1, args=([*common, "--train.overwrite=true", "--train.steps=2"],))
    assert [r["step"] for r in _records(run)] == [1, 2]
    assert not [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "resumed_from"]
    aside = sorted(p.name for p in run.iterdir() if ".replaced-" in p.name)
    assert [n.split(".replaced-")[0] for n in aside] == ["checkpoints", "metrics", "tensorboard"]
    old = [json.loads(x) for x in next(run.glob("metrics.replaced-*.jsonl")).read_text().splitlines()]
    assert [r["step"] for r in old if r["kind"] == "train"] == [1, 2, 3, 4, 3, 4]
    assert [e.step for e in _events(run).Scalars("train/loss")] == [1, 2]


class FakeWandb(types.ModuleType):
    """Records init / log / finish calls; `util.generate_id` and `Histogram` like wandb's."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []
        self.util = types.SimpleNamespace(generate_id=lambda: f"id{len(self.calls)}")
        fake = self

        class Run:
            def log(self, data, step=None):
                fake.calls.append(("log", step, data))

            def finish(self):
                fake.calls.append(("finish",))

        class Histogram:
            def __init__(self, np_histogram):
                self.counts = np_histogram[0].tolist()

        self.Run, self.Histogram = Run, Histogram

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self.Run()


def _train_with_fake_wandb(rank, world, overrides):
    """Runs in a forked rank: its own module table holds the fake. Returns plain data."""
    fake = FakeWandb()
    sys.modules["wandb"] = fake
    try:
        _train(rank, world, overrides)
    finally:
        del sys.modules["wandb"]
    out = []
    for call in fake.calls:
        if call[0] == "init":
            out.append(("init", {k: v for k, v in call[1].items() if k != "config"}))
        elif call[0] == "log":
            out.append(("log", call[1], {k: getattr(v, "counts", v) for k, v in call[2].items()}))
        else:
            out.append(call)
    return out


def test_wandb_sink_with_a_fake_module(tmp_path, text_dir):
    run = tmp_path / "run"
    common = [*TINY, f"--data.paths={text_dir}", f"--data.data_dir={tmp_path / 'data'}",
              f"--train.run_dir={run}", "--train.wandb_project=dmoe-test"]
    calls = run_ranks(_train_with_fake_wandb, 1, args=(common,))[0]
    assert calls[0] == ("init", {"project": "dmoe-test", "id": "id0", "resume": "allow", "dir": str(run),
                                 "name": "run"})
    assert calls[-1] == ("finish",)
    logs = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logs] == [0, 2, 4, 4]  # eval at 0, train at 2 and 4, eval at 4
    train_log = logs[1][2]
    assert train_log["train/loss"] > 0 and "train/drop_frac/moe1" in train_log
    assert sum(train_log["train/expert_load/moe0"]) == 4 * 16 * 2  # one layer's assignments
    assert (run / "wandb_run_id").read_text() == "id0\n"
