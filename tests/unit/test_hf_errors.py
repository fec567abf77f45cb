"""Bad input to `dmoe import` / `dmoe export --format hf`: one line naming the file, tensor
or option, exit 2, and nothing left where the output would have gone."""
import json

import pytest
from safetensors.torch import save_file

from dmoe.cli import main as dmoe_main
from dmoe.config import load_config
from dmoe.hf.errors import HFError
from dmoe.hf.families import family_for
from tests.hf_models import save_tiny
from tests.tiny_runs import REPO, train_preset

pytest.importorskip("transformers")


def _fails(argv, capsys, out, *needles) -> str:
    capsys.readouterr()
    assert dmoe_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists() and not list(out.parent.glob(f".tmp-{out.name}*"))
    return err


def _import(tmp_path, capsys, hf, *needles) -> str:
    out = tmp_path / "run"
    return _fails(["import", str(hf), str(out)], capsys, out, *needles)


def test_not_an_hf_checkpoint(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("hello")
    _import(tmp_path, capsys, tmp_path / "hf", "hf: not a Hugging Face checkpoint (no config.json)")


def test_unsupported_model_type(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
    _import(tmp_path, capsys, tmp_path / "hf", "config.json: model_type 'gpt2' is not supported",
            "mixtral, qwen2_moe, qwen3_moe")


def test_pickle_only_weights(tmp_path, capsys):
    save_tiny("llama", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    _import(tmp_path, capsys, tmp_path / "hf", "pytorch_model.bin (pickle)")


def test_missing_shard(tmp_path, capsys):
    model = save_tiny("mixtral", tmp_path / "saved")
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "hf" / shard).unlink()
    _import(tmp_path, capsys, tmp_path / "hf", f"{shard}: missing (named by model.safetensors.index.json)")


def test_shape_mismatch_names_the_tensor(tmp_path, capsys):
    save_tiny("mixtral", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] = 20  # the saved experts are 24 wide
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    _import(tmp_path, capsys, tmp_path / "hf",
            "model.layers.0.block_sparse_moe.experts.0.w1.weight has shape [24, 32]",
            "config.json implies [20, 32]")


def test_missing_and_unexpected_tensors(tmp_path, capsys):
    from safetensors.torch import load_file

    save_tiny("qwen2_moe", tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    extra = dict(tensors, **{"model.layers.0.mlp.bonus.weight": tensors["model.norm.weight"].clone()})
    save_file(extra, str(path), metadata={"format": "pt"})
    _import(tmp_path, capsys, tmp_path / "hf", "unexpected tensor model.layers.0.mlp.bonus.weight")
    del tensors["model.layers.2.self_attn.k_proj.bias"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    _import(tmp_path, capsys, tmp_path / "hf", "missing tensor model.layers.2.self_attn.k_proj.bias")


@pytest.mark.parametrize("field,value,needle", [
    ("sliding_window", 8, "sliding_window (8)"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling"),
    ("hidden_act", "gelu", "hidden_act ('gelu')"),
])
def test_inexpressible_hf_config(tmp_path, capsys, field, value, needle):
    save_tiny("mixtral", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config[field] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    _import(tmp_path, capsys, tmp_path / "hf", needle)


def test_existing_run_dir_is_left_alone(tmp_path, capsys):
    save_tiny("llama", tmp_path / "hf")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert dmoe_main(["import", str(tmp_path / "hf"), str(tmp_path / "run")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("config,overrides,needle", [
    ("default", [], "model.norm (layernorm)"),
    ("switch-tiny", [], "model.norm (layernorm)"),
    ("deepseek-tiny", [], "moe.score_func (sigmoid)"),
    ("mixtral-tiny", ["--moe.every=2"], "moe.every / moe.first_dense_layers (2 / 0)"),
    ("mixtral-tiny", ["--moe.top_k=1"], "moe.normalize_topk (top_k 1)"),
    ("mixtral-tiny", ["--model.positions=learned"], "model.positions (learned)"),
    ("qwen3-moe-tiny", ["--model.qkv_bias=true"], "model.qkv_bias (True)"),
    ("qwen2-moe-tiny", ["--moe.shared_expert_gate=false"], "moe.shared_expert_gate (False)"),
    ("qwen2-moe-tiny", ["--model.qk_norm=true"], "model.qk_norm (True)"),
    ("qwen2-moe-tiny", ["--moe.activation=gelu"], "moe.activation (gelu)"),
])
def test_export_refuses_what_no_family_expresses(config, overrides, needle):
    cfg = load_config(REPO / "configs" / f"{config}.yaml", overrides)
    with pytest.raises(HFError, match="no Hugging Face family expresses") as err:
        family_for(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("config,overrides,family", [
    ("mixtral-tiny", [], "mixtral"), ("qwen2-moe-tiny", [], "qwen2_moe"),
    ("qwen3-moe-tiny", [], "qwen3_moe"),
    ("mixtral-tiny", ["--moe.normalize_topk=false", "--model.qk_norm=true"], "qwen3_moe"),
    ("mixtral-tiny", ["--moe.first_dense_layers=4"], "llama"),
    ("qwen2-moe-tiny", ["--moe.first_dense_layers=4"], "qwen2"),
])
def test_family_choice(config, overrides, family):
    assert family_for(load_config(REPO / "configs" / f"{config}.yaml", overrides)) == family


def test_export_of_a_trained_switch_preset_is_refused(tmp_path, capsys):
    train_preset(tmp_path, "switch-tiny", steps=1)
    out = tmp_path / "hf"
    _fails(["export", str(tmp_path / "run"), str(out), "--format", "hf"], capsys, out,
           "export error: no Hugging Face family expresses model.norm (layernorm)")
