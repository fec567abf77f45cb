"""Bad inputs through `dmoe train` in this process (dmoe.cli.main): each is refused with
one line naming the field or file and the value, a non-zero exit and no traceback."""
import json

import pytest

from dmoe.cli import main
from dmoe.config import ConfigError, load_config

# (overrides, what the one line must contain); {tmp} is a scratch dir with: afile (a file),
# dup.yaml (a key twice), ckpt_* (broken checkpoint trees)
CONFIG_CASES = [
    (["--train.log_every=0"], "train.log_every (0) must be >= 1"),
    (["--train.eval_every=0"], "train.eval_every (0) must be >= 1"),
    (["--train.eval_batches=0"], "train.eval_batches (0) must be >= 1"),
    (["--train.lr=-0.1"], "train.lr (-0.1) must be > 0"),
    (["--train.lr=0"], "train.lr (0.0) must be > 0"),
    (["--train.lr=.nan"], "train.lr (nan) must be a finite number"),
    (["--train.lr=.inf"], "train.lr (inf) must be a finite number"),
    (["--train.lr=nan"], "train.lr must be float, got 'nan' (str)"),
    (["--train.lr=1e-4x"], "train.lr must be float, got '1e-4x' (str)"),
    (["--train.min_lr=-1"], "train.min_lr (-1.0) must be >= 0"),
    (["--train.threads=-1"], "train.threads (-1) must be >= 0"),
    (["--train.seed=-5"], "train.seed (-5) must be >= 0"),
    (["--train.warmup_steps=-1"], "train.warmup_steps (-1) must be >= 0"),
    (["--train.weight_decay=-0.1"], "train.weight_decay (-0.1) must be >= 0"),
    (["--train.grad_clip=-1"], "train.grad_clip (-1.0) must be >= 0"),
    (["--train.max_skipped_steps=-1"], "train.max_skipped_steps (-1) must be >= 0"),
    (["--train.steps=0"], "train.steps (0) must be >= 1"),
    (["--train.keep_last=-1"], "train.keep_last (-1) must be >= 0"),
    (["--train.nonfinite=ignore"], "train.nonfinite ('ignore') must be one of ['stop', 'skip']"),
    (["--train.overwrite=maybe"], "train.overwrite must be bool, got 'maybe' (str)"),
    (["--model.dropout=1.5"], "model.dropout (1.5) must be >= 0 and <= 1"),
    (["--model.dropout=-0.1"], "model.dropout (-0.1) must be >= 0 and <= 1"),
    (["--model.rope_theta=0"], "model.rope_theta (0.0) must be > 0"),
    (["--model.ffn_dim=0"], "model.ffn_dim (0) must be >= 1"),
    (["--model.vocab_size=-1"], "model.vocab_size (-1) must be >= 0"),
    (["--model.norm_eps=.nan"], "model.norm_eps (nan) must be in (0, 1)"),
    (["--moe.capacity_factor=-1"], "moe.capacity_factor (-1.0) must be >= 0"),
    (["--moe.capacity_factor=.nan"], "moe.capacity_factor (nan) must be a finite number"),
    (["--moe.capacity_factor=.inf"], "moe.capacity_factor (inf) must be a finite number"),
    (["--moe.eval_capacity_factor=-2"], "moe.eval_capacity_factor (-2.0) must be >= 0"),
    (["--moe.min_capacity=-1"], "moe.min_capacity (-1) must be >= 0"),
    (["--moe.router_jitter=2"], "moe.router_jitter (2.0) must be >= 0 and <= 1"),
    (["--moe.aux_loss_coef=-1"], "moe.aux_loss_coef (-1.0) must be >= 0"),
    (["--moe.z_loss_coef=-.5"], "moe.z_loss_coef (-0.5) must be >= 0"),
    (["--data.max_corpus_mb=0"], "data.max_corpus_mb (0.0) must be > 0"),
    (["--data.bpe_vocab_size=0"], "data.bpe_vocab_size (0) must be >= 1"),
    (["--data.val_fraction=1"], "data.val_fraction (1.0) must be in (0, 1)"),
    (["--train.run_dir={tmp}/afile/run"], "train.run_dir ({tmp}/afile/run): {tmp}/afile is a file, not a directory"),
    (["--train.run_dir={tmp}/afile"], "train.run_dir ({tmp}/afile): {tmp}/afile is a file, not a directory"),
    (["--data.data_dir={tmp}/afile"], "data.data_dir ({tmp}/afile): {tmp}/afile is a file, not a directory"),
    (["--data.paths={tmp}/nothing.txt"], "data.paths ({tmp}/nothing.txt): no such file or directory"),
    (["--config={tmp}/dup.yaml"], "{tmp}/dup.yaml: key 'lr' appears twice (line 4)"),
    (["--config={tmp}/missing.yaml"], "cannot read config {tmp}/missing.yaml"),
    (["--moe.num_experts=6", "--parallel.ep=4"], "moe.num_experts (6) must be divisible by parallel.ep (4)"),
    (["--parallel.tp=2"], "parallel.tp"),  # a 2-way layout on one rank
]

CHECKPOINT_CASES = [
    (["--train.resume={tmp}/nowhere"], "train.resume ({tmp}/nowhere): no checkpoint"),
    (["--train.resume={tmp}/ckpt_binary"], "{tmp}/ckpt_binary/checkpoints/latest: not a text file"),
    (["--train.resume={tmp}/ckpt_absolute"], "{tmp}/ckpt_absolute/checkpoints/latest: names '/"),
    (["--train.resume={tmp}/ckpt_dangling"], "{tmp}/ckpt_dangling/checkpoints/latest: names step_000009, which has no manifest.json"),
    (["--train.resume={tmp}/ckpt_nolayout/checkpoints/step_000001"], "{tmp}/ckpt_nolayout/checkpoints/step_000001/manifest.json: no valid 'layout' entry"),
    (["--train.resume={tmp}/ckpt_notjson/checkpoints/step_000001"], "{tmp}/ckpt_notjson/checkpoints/step_000001/manifest.json: missing or unreadable manifest"),
    (["--train.resume={tmp}/ckpt_format/checkpoints/step_000001"], "manifest.json: format 'other/1', expected 'dmoe-checkpoint/1'"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return make_scratch(tmp_path_factory.mktemp("bad"))


def make_scratch(tmp):
    """The files the cases name (also used by tests/system/test_bad_input_table_launchers.py)."""
    (tmp / "afile").write_text("x")
    (tmp / "dup.yaml").write_text("train:\n  steps: 5\n  lr: 0.1\n  lr: 0.2\n")
    good = {"format": "dmoe-checkpoint/1", "step": 1, "layout": {"world_size": 1, "tp": 1, "ep": 1, "dp": 1},
            "files": {}, "tensors": {}}
    for name, latest, manifest in [
        ("ckpt_binary", b"\xff\xfe\x00step", good), ("ckpt_absolute", str(tmp / "ckpt_binary").encode(), good),
        ("ckpt_dangling", b"step_000009", good),
        ("ckpt_nolayout", b"step_000001", {k: v for k, v in good.items() if k != "layout"}),
        ("ckpt_notjson", b"step_000001", "{not json"), ("ckpt_format", b"step_000001", {**good, "format": "other/1"}),
    ]:
        step = tmp / name / "checkpoints" / "step_000001"
        step.mkdir(parents=True)
        (step / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
        (step.parent / "latest").write_bytes(latest)
    return tmp


def base_args(scratch) -> list[str]:
    return [f"--train.run_dir={scratch}/run", f"--data.data_dir={scratch}/data", "--data.max_corpus_mb=1",
            "--train.steps=1", "--train.eval_batches=1", "--model.d_model=16", "--model.n_layers=1",
            "--model.seq_len=16", "--train.micro_batch_size=2"]


def _run(argv, scratch, capsys):
    argv = [a.replace("{tmp}", str(scratch)) for a in argv]
    code = main(["train", *base_args(scratch), *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,message", CONFIG_CASES + CHECKPOINT_CASES,
                         ids=[" ".join(a)[:60] for a, _ in CONFIG_CASES + CHECKPOINT_CASES])
def test_bad_input_is_one_line(argv, message, scratch, capsys, monkeypatch):
    monkeypatch.setenv("DMOE_NO_PROGRESS", "1")
    code, err = _run(argv, scratch, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert message.replace("{tmp}", str(scratch)) in lines[0], lines[0]


def test_yaml_float_rule(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot) as a string: a decimal literal is taken as the float."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  min_lr: 1.0e-5\nmoe:\n  capacity_factor: 2E+0\n")
    cfg = load_config(path, ["--train.weight_decay=5e-2"])
    assert (cfg.train.lr, cfg.train.min_lr, cfg.moe.capacity_factor, cfg.train.weight_decay) == \
        (1e-4, 1e-5, 2.0, 0.05)
    with pytest.raises(ConfigError, match="model.d_model must be int, got '1e3'"):
        load_config(None, ["--model.d_model=1e3"])  # only float fields read number strings
