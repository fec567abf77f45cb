"""A Slurm-requeued job resumes like a torchrun restart (dmoe.startup.elastic.restarted)."""

from dmoe.startup.command import resolve_config
from dmoe.startup.elastic import restarted
from dmoe.startup.launchers import LaunchInfo


def test_restarted_names_the_variable():
    assert restarted({}) == (0, "")
    assert restarted({"SLURM_RESTART_COUNT": "0", "TORCHELASTIC_RESTART_COUNT": "0"}) == (0, "")
    assert restarted({"SLURM_RESTART_COUNT": "2"}) == (2, "SLURM_RESTART_COUNT")
    assert restarted({"SLURM_RESTART_COUNT": "x"}) == (0, "")
    # a torchrun restart inside a requeued job: torchrun's count is the one named
    assert restarted({"SLURM_RESTART_COUNT": "1", "TORCHELASTIC_RESTART_COUNT": "3"}) == (
        3,
        "TORCHELASTIC_RESTART_COUNT",
    )


def test_slurm_requeue_reads_as_resume_auto(monkeypatch, tmp_path):
    info = LaunchInfo(0, 1, 0, 1, "slurm")
    args = [f"--train.run_dir={tmp_path}"]
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert resolve_config("configs/default.yaml", args, info)[0].train.resume == ""
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resolve_config("configs/default.yaml", args, info)[0].train.resume == "auto"
    explicit = resolve_config("configs/default.yaml", [*args, "--train.resume=/x"], info)[0]
    assert explicit.train.resume == "/x"  # an explicit resume wins
