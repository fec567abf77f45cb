"""--help that teaches: every subcommand, every config key with its type, default, allowed
values and description; close-match suggestions; config show; the dry run."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from dmoe.cli import COMMANDS, main
from dmoe.config import Config, ConfigError, load_config
from dmoe.model.flops import count_params

REPO = Path(__file__).resolve().parents[2]


def _every_key():
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            yield f"{section.name}.{f.name}", f


def test_dmoe_help_lists_every_command_with_an_example(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"\n  {name} " in out
    assert "examples:" in out and "dmoe train --dry-run" in out


def test_unknown_command_suggests_the_closest(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian' (did you mean train?)" in capsys.readouterr().err


def test_every_config_key_has_a_description():
    missing = [key for key, f in _every_key() if not f.metadata.get("help")]
    assert missing == []


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value == []:
        return "[]"
    return {None: "null", "": '""'}.get(value, str(value))


@pytest.mark.parametrize("cmd", [[sys.executable, "launch/train.py", "--help"],
                                 [sys.executable, "-m", "dmoe.cli", "train", "--help"]])
def test_train_help_lists_every_key_with_type_default_choices(cmd):
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  --") and "." in line.split()[0]}
    defaults = Config()
    for key, f in _every_key():
        line = lines[f"--{key}"]
        section, name = key.split(".")
        value = getattr(getattr(defaults, section), name)
        assert f" {_shown(value)} " in line, line
        assert f.metadata["help"] in line, line
        if "choices" in f.metadata:
            assert "{" + "|".join(f.metadata["choices"]) + "}" in line, line
    assert "float|null" in lines["--moe.capacity_factor"]


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'moe.capacity_facter' "
                                          r"\(did you mean moe.capacity_factor\?\)"):
        load_config(None, ["--moe.capacity_facter=1.5"])
    with pytest.raises(ConfigError, match=r"\(did you mean moe.capacity_factor\?\)"):
        load_config(None, ["--train.capacity_factor=1.5"])  # right key, wrong section
    with pytest.raises(ConfigError, match=r"unknown config key 'mdoel' \(did you mean model\?\)"):
        load_config(None, ["--mdoel.d_model=8"])


def test_config_show_prints_the_resolved_config_as_yaml(capsys):
    assert main(["config", "show", "--config", "mixtral-tiny", "--moe.top_k=1"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == load_config("configs/mixtral-tiny.yaml", ["--moe.top_k=1"]).to_dict()
    assert main(["config", "show", "--config", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: config 'nope' not found") and err.count("\n") == 1


def test_dry_run_prints_sizes_and_starts_nothing(capsys, tmp_path):
    args = ["train", "--dry-run", "--config", "default", "--world-size", "4", "--parallel.ep=2",
            f"--train.run_dir={tmp_path}/run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    counts = count_params(load_config("default"))
    assert f"total {counts.total / 1e6:.4g} M" in out and "active per token" in out
    assert "world 4 = tp 1 x dp 4; experts in ep 2 shards" in out and "FLOP per trained token" in out
    assert "memory/rank" in out and f"run dir      {tmp_path}/run" in out
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


def test_dry_run_refuses_a_bad_layout_with_one_line(capsys):
    assert main(["train", "--dry-run", "--world-size", "3", "--parallel.ep=2"]) == 2
    err = capsys.readouterr().err
    assert err == "config error: parallel.ep (2) must divide the data-parallel size (3)\n"


class _Captured(Exception):
    pass


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_tool_flag_has_help_and_shows_its_default(command, monkeypatch):
    """Each command's parser (caught at its first parse call): every flag and positional has
    help text, and the formatter prints defaults (argparse's ArgumentDefaultsHelpFormatter)."""
    import argparse

    from dmoe.tools.help_format import HelpFormatter

    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise _Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(_Captured):
        COMMANDS[command][0](["x"] if command == "config" else [])
    todo, seen = [parsers[0]], []
    while todo:
        parser = todo.pop()
        seen.append(parser)
        assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), parser.prog
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += list(action.choices.values())
            elif not isinstance(action, argparse._HelpAction):
                assert action.help, f"{parser.prog} {action.option_strings or action.dest} has no help"
    assert all(issubclass(p.formatter_class, HelpFormatter) for p in seen)
