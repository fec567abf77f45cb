"""The training metrics' pure parts: MFU on a hand case, dead-expert detection on a synthetic
stream of routed counts, the series rules, peak memory names and the wandb-missing line."""
import json
import logging
import sys

import pytest
import torch

from dmoe.config import ConfigError, load_config
from dmoe.model.flops import train_flops_per_token
from dmoe.train.dead_experts import DeadExpertTracker
from dmoe.train.run_series import start_series
from dmoe.train.speed import a2a_seconds, measure_matmul_flops, mfu, peak_memory
from dmoe.train.wandb_sink import check_wandb


def test_mfu_hand_case():
    # 6e6 FLOPs per token, 1e5 tokens/s over 4 ranks: 1.5e11 FLOP/s per rank; peak 5e11 -> 0.3
    assert mfu(6e6, 1e5, 4, 5e11) == pytest.approx(0.3, rel=1e-12)
    assert mfu(6e6, 1e5, 4, 0.0) == 0.0
    # with dmoe's own FLOP count: 2 ranks at 1000 tokens/s against a 1 TFLOP/s peak
    cfg = load_config(None, ["--model.vocab_size=256"])
    assert mfu(train_flops_per_token(cfg), 1000, 2, 1e12) == pytest.approx(
        train_flops_per_token(cfg) * 500 / 1e12, rel=1e-12)


def test_measured_peak_is_a_plausible_rate():
    flops = measure_matmul_flops(torch.device("cpu"), seconds=0.05)
    assert 1e8 < flops < 1e13


def _stream(rows):
    """[[layer0 counts], [layer1 counts]] per step -> tensors."""
    return [torch.tensor(r, dtype=torch.float64) for r in rows]


def test_dead_expert_reported_once_until_it_revives():
    t = DeadExpertTracker(steps=3)
    alive, e1_dead = [[5, 5, 5], [4, 4, 4]], [[5, 0, 5], [4, 4, 4]]
    both = [[5, 0, 5], [4, 4, 0]]
    seen = [t.update(s, x) for s, x in enumerate(_stream(
        [alive, e1_dead, e1_dead, e1_dead, both, both, both, e1_dead,  # steps 0-7
         alive, e1_dead, e1_dead, e1_dead]), start=0)]                 # 8: layer 0 expert 1 revives
    assert seen[:3] == [{}, {}, {}]
    assert seen[3] == {0: [1]}  # three zero steps in a row: 1, 2, 3
    assert seen[4:6] == [{}, {}]  # no repeat while still dead
    assert seen[6] == {1: [2]}  # layer 1 expert 2: zero at steps 4, 5, 6
    assert seen[7] == {}
    assert seen[8:11] == [{}, {}, {}]
    assert seen[11] == {0: [1]}  # revived at 8, dead again for 9, 10, 11: reported again
    assert t.dead_per_layer() == [1, 0]


def test_dead_expert_several_at_once_and_off():
    t = DeadExpertTracker(steps=1, layer_names=["moe0 (blocks.1.ffn)"])
    assert t.update(7, torch.tensor([[0.0, 3.0, 0.0, 0.0]])) == {0: [0, 2, 3]}
    assert t.dead_per_layer() == [3]
    off = DeadExpertTracker(steps=0)
    assert off.update(1, torch.zeros(2, 4)) == {} and off.dead_per_layer() == []


def test_dead_expert_warning_names_layer_and_experts(caplog):
    t = DeadExpertTracker(steps=2, layer_names=["moe0 (blocks.0.ffn)", "moe1 (blocks.1.ffn)"])
    with caplog.at_level(logging.WARNING, logger="dmoe.train.dead_experts"):
        for step in (1, 2):
            t.warn(step, t.update(step, torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 0.0]])))
    assert [r.getMessage() for r in caplog.records] == [
        ("step 2: moe1 (blocks.1.ffn): experts 0, 2 received no tokens for 2 consecutive steps "
        "(train.dead_expert_steps)")]


def test_fresh_start_moves_old_metrics_aside(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "kind": "train"}) + "\n")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_text("x")
    with caplog.at_level(logging.WARNING):
        series = start_series(tmp_path, 0, None)
    assert series.resumed_from == 0 and series.purge_step is None
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0].startswith("metrics.replaced-") and names[0].endswith(".jsonl")
    assert names[1].startswith("tensorboard.replaced-")
    assert "moved aside" in caplog.text
    # nothing to move: nothing said
    assert start_series(tmp_path / "empty", 0, None).moved_aside == ()


def test_resume_keeps_the_series(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    series = start_series(tmp_path, 40, tmp_path / "checkpoints" / "step_000040")
    assert (series.resumed_from, series.purge_step) == (40, 41)
    assert series.checkpoint.endswith("step_000040") and (tmp_path / "metrics.jsonl").exists()


def test_peak_memory_names_its_kind():
    name, mib = peak_memory(torch.device("cpu"))
    assert name == "peak_rss_mib" and mib > 10


def test_a2a_seconds_per_layer():
    from dmoe.parallel.comm_trace import CommEvent

    ev = [CommEvent(1, "a2a_dispatch", 0, "all_to_all", "ep", 2, "fwd", 8, [4, 4], [4, 4], 0.25),
          CommEvent(1, "a2a_combine", 1, "all_to_all", "ep", 2, "bwd", 8, [4, 4], [4, 4], 0.5),
          CommEvent(1, "dp_grads", None, "all_reduce", "dp", 2, "other", 8, [8, 8], [8, 8], 9.0)]
    assert a2a_seconds(ev, 2) == (0.75, [0.25, 0.5])


def test_wandb_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    cfg = load_config(None, ["--train.wandb_project=myproj"])
    with pytest.raises(ConfigError) as err:
        check_wandb(cfg)
    assert str(err.value) == ("train.wandb_project ('myproj') is set but wandb is not installed: "
                              "pip install wandb, or leave train.wandb_project empty")
    check_wandb(load_config(None, []))  # off by default: nothing imported


@pytest.mark.parametrize("override,message", [
    ("--train.peak_tflops=-1", "train.peak_tflops (-1.0) must be >= 0"),
    ("--train.dead_expert_steps=-5", "train.dead_expert_steps (-5) must be >= 0"),
])
def test_new_fields_have_ranges(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])
