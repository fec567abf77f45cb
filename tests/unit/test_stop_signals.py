"""dmoe.startup.signals and dmoe.startup.elastic in one process."""
import os
import signal

import torch

from dmoe.startup.command import resolve_config
from dmoe.startup.elastic import join_restarted_group, restart_count
from dmoe.startup.launchers import LaunchInfo
from dmoe.startup.signals import Interrupted, StopOnSignal


def test_signal_sets_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert stop.agreed(torch.device("cpu")) == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed(torch.device("cpu")) == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert Interrupted("x", signal.SIGINT).exit_code == 130


def test_elastic_restart_reads_as_resume_auto(monkeypatch, tmp_path):
    info = LaunchInfo(0, 1, 0, 1, "torchrun")
    args = [f"--train.run_dir={tmp_path}"]
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert restart_count() == 0 and resolve_config("configs/default.yaml", args, info)[0].train.resume == ""
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restart_count() == 1
    assert resolve_config("configs/default.yaml", args, info)[0].train.resume == "auto"
    explicit = resolve_config("configs/default.yaml", [*args, "--train.resume=/x"], info)[0]
    assert explicit.train.resume == "/x"  # an explicit resume wins
    # without torchrun's agent store there is nothing to re-namespace
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert join_restarted_group(explicit, info) is False
