import pytest

from dmoe.config import ConfigError, load_config, parse_overrides, save_config


def test_defaults_yaml_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("moe:\n  num_experts: 16\n  capacity_factor: 1.0\ntrain:\n  steps: 7\n")
    cfg = load_config(path, ["--moe.capacity_factor=1.5", "--train.run_dir", "x/y"])
    assert cfg.moe.num_experts == 16 and cfg.moe.capacity_factor == 1.5
    assert cfg.train.steps == 7 and cfg.train.run_dir == "x/y"
    assert cfg.model.d_model == 128  # untouched default


def test_dropless_and_int_to_float():
    cfg = load_config(None, ["--moe.capacity_factor=null", "--train.lr=1"])
    assert cfg.moe.capacity_factor is None and cfg.train.lr == 1.0


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--moe.capacity_facter=1.5"], "unknown config key 'moe.capacity_facter' (did you mean "
                                        "moe.capacity_factor?); valid keys: num_experts"),
        (["--nope.x=1"], "unknown config key 'nope'"),
        (["--moe.num_experts=abc"], "moe.num_experts must be int, got 'abc' (str)"),
        (["--moe.num_experts=true"], "moe.num_experts must be int, got True (bool)"),
        (["--moe.activation=relu"], "moe.activation ('relu') must be one of ['gelu', 'swiglu']"),
        (["--moe.num_experts=6", "--parallel.ep=4"], "moe.num_experts (6) must be divisible by parallel.ep (4)"),
        (["--moe.top_k=9"], "moe.top_k (9) must be in [1, moe.num_experts (8)]"),
        (["--train.zero_stage=3"], "train.zero_stage (3) must be 0, 1 or 2: DeepSpeed does not support ZeRO stage 3"),
        (["--model.n_heads=3"], "model.d_model (128) must be divisible by model.n_heads (3)"),
        (["moe.top_k=1"], "unexpected argument 'moe.top_k=1'"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.d_modle'"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/default.yaml", ["--moe.top_k=1"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_parse_overrides_nests():
    assert parse_overrides(["--a.b.c=3"]) == {"a": {"b": {"c": 3}}}
