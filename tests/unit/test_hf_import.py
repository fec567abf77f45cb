"""`dmoe import`: tiny random HF models (built here, nothing downloads) -> dmoe checkpoint ->
the same logits and the same chosen experts; the mapping of config fields; the round trip
back to HF bit for bit. The ep2 / tp2 layouts: tests/distributed/test_hf_layouts.py."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dmoe.config import load_config
from dmoe.hf.exporter import export_hf
from dmoe.hf.importer import import_hf
from dmoe.model.from_checkpoint import model_from_checkpoint
from tests.hf_models import MOE, dmoe_forward, hf_forward, save_tiny, to_float64, tokens

pytest.importorskip("transformers")

FP32_TOL, FP64_TOL, FP64_EXACT_TOL = 1e-5, 5e-6, 1e-12


def _imported(tmp_path, family, **changes):
    hf = save_tiny(family, tmp_path / "hf", **changes)
    import_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
    return hf, tmp_path / "run"


def _routes_equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("family", MOE)
def test_logits_and_routes_match_fp32_and_fp64(tmp_path, family):
    hf, run = _imported(tmp_path, family)
    ids = tokens()
    (hf_logits, hf_routes), (logits, routes) = hf_forward(hf, ids), dmoe_forward(model_from_checkpoint(run), ids)
    fp32 = float((hf_logits - logits).abs().max())
    assert hf_routes and _routes_equal(hf_routes, routes)
    model64 = model_from_checkpoint(run, torch.float64)
    logits64, routes64 = dmoe_forward(model64, ids)
    fp64 = float((hf_forward(to_float64(hf), ids)[0] - logits64).abs().max())
    exact = float((hf_forward(to_float64(hf, islands=False), ids)[0] - logits64).abs().max())
    print(f"{family}: max |logits diff| fp32 {fp32:.2e}, fp64 {fp64:.2e} (transformers' fp32 "
          f"norm/rope/router), fp64 with those in fp64 {exact:.2e}; |logits| max "
          f"{float(hf_logits.abs().max()):.2f}")
    assert fp32 <= FP32_TOL and fp64 <= FP64_TOL and exact <= FP64_EXACT_TOL
    assert _routes_equal(hf_routes, routes64)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dense_logits_match(tmp_path, family):
    hf, run = _imported(tmp_path, family)
    model = model_from_checkpoint(run)
    assert not any(".experts." in name for name, _ in model.named_parameters())
    ids = tokens()
    diff = float((hf_forward(hf, ids)[0] - dmoe_forward(model, ids)[0]).abs().max())
    exact = float((hf_forward(to_float64(hf, islands=False), ids)[0] -
                   dmoe_forward(model_from_checkpoint(run, torch.float64), ids)[0]).abs().max())
    print(f"{family}: max |logits diff| fp32 {diff:.2e}, fp64 (no fp32 islands) {exact:.2e}")
    assert diff <= FP32_TOL and exact <= FP64_EXACT_TOL


def test_config_mapping(tmp_path):
    """The options each family's config fields become (README table)."""
    expected = {
        "mixtral": {"model.n_kv_heads": 2, "model.rope_theta": 1e6, "moe.num_experts": 4,
                    "moe.top_k": 2, "moe.expert_ffn_dim": 24, "moe.normalize_topk": True,
                    "moe.every": 1, "moe.first_dense_layers": 0, "model.qkv_bias": False},
        "qwen2_moe": {"model.qkv_bias": True, "moe.normalize_topk": False,
                      "moe.first_dense_layers": 1, "moe.num_shared_experts": 1,
                      "moe.shared_expert_ffn_dim": 40, "moe.shared_expert_gate": True,
                      "model.ffn_dim": 48, "moe.expert_ffn_dim": 16, "moe.top_k": 3},
        "qwen3_moe": {"model.qk_norm": True, "model.head_dim": 12, "moe.every": 2,
                      "moe.normalize_topk": True, "moe.num_shared_experts": 0},
        "llama": {"moe.first_dense_layers": 3, "model.mlp_activation": "swiglu", "model.bias": False},
    }
    for family, values in expected.items():
        save_tiny(family, tmp_path / family / "hf")
        import_hf(str(tmp_path / family / "hf"), str(tmp_path / family / "run"))
        cfg = load_config(tmp_path / family / "run" / "config.yaml")
        assert cfg.moe.capacity_factor is None and cfg.moe.eval_capacity_factor is None
        assert cfg.model.norm == "rmsnorm" and cfg.train.run_dir == str(tmp_path / family / "run")
        for key, value in values.items():
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == value, (family, key)


def test_checkpoint_is_params_only_for_one_rank(tmp_path):
    _, run = _imported(tmp_path, "mixtral")
    manifest = json.loads((run / "checkpoints" / "step_000000" / "manifest.json").read_text())
    assert (run / "checkpoints" / "latest").read_text() == "step_000000"
    assert manifest["layout"] == {"world_size": 1, "tp": 1, "ep": 1, "dp": 1}
    assert {tuple(t["states"]) for t in manifest["tensors"].values()} == {("param",)}
    assert manifest["imported_from"]["model_type"] == "mixtral"


@pytest.mark.parametrize("family,dtype", [("mixtral", "float32"), ("qwen2_moe", "float32"),
                                          ("qwen3_moe", "float32"), ("llama", "float32"),
                                          ("qwen3_moe", "bfloat16")])
def test_round_trip_is_bit_identical(tmp_path, family, dtype):
    save_tiny(family, tmp_path / "hf", dtype=getattr(torch, dtype))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
    export_hf(str(tmp_path / "run"), str(tmp_path / "out"), dtype=dtype)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in sorted(a.keys()):
            x, y = a.get_tensor(name), b.get_tensor(name)
            assert x.dtype == y.dtype and torch.equal(x, y), name
    source = json.loads((tmp_path / "hf" / "config.json").read_text())
    back = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("model_type", "architectures", "hidden_size", "num_key_value_heads",
                "vocab_size", "rms_norm_eps", "tie_word_embeddings"):
        assert back[key] == source[key], key


@pytest.mark.parametrize("family", MOE)
def test_fused_expert_layout_reads_too(tmp_path, family):
    """transformers 5's in-memory names (mlp.experts.gate_up_proj [E, 2F, D]) as a file."""
    hf = save_tiny(family, tmp_path / "saved")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    import_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
    ids = tokens()
    diff = float((hf_forward(hf, ids)[0] - dmoe_forward(model_from_checkpoint(tmp_path / "run"), ids)[0])
                 .abs().max())
    assert diff <= FP32_TOL


def test_tied_embeddings(tmp_path):
    hf, run = _imported(tmp_path, "llama", tie_word_embeddings=True)
    model = model_from_checkpoint(run)
    assert model.lm_head.weight is model.tok_emb.weight
    ids = tokens()
    assert float((hf_forward(hf, ids)[0] - dmoe_forward(model, ids)[0]).abs().max()) <= FP32_TOL
    export_hf(str(run), str(tmp_path / "out"))
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"]


def test_overrides_and_base_config_add_training_settings(tmp_path):
    save_tiny("mixtral", tmp_path / "hf")
    import_hf(str(tmp_path / "hf"), str(tmp_path / "run"), ["--train.lr=0.0001", "--model.seq_len=32"],
              base_config=str(Path(__file__).resolve().parents[2] / "configs" / "mixtral-tiny.yaml"))
    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert cfg.train.lr == 1e-4 and cfg.model.seq_len == 32 and cfg.train.steps == 150
    assert cfg.model.d_model == 32 and cfg.moe.expert_ffn_dim == 24  # config.json wins over the preset


def test_tokenizer_and_generation_files_travel_and_generate_matches(tmp_path, capsys):
    """The source's tokenizer and generation config come back out of an export, and
    `dmoe generate` of the import gives transformers' greedy tokens (stopping at its eos)."""
    from dmoe.cli import main as dmoe_main
    from dmoe.hf.tokenizer import byte_tokenizer_json

    hf = save_tiny("mixtral", tmp_path / "hf", vocab_size=256)
    (tmp_path / "hf" / "tokenizer.json").write_text(byte_tokenizer_json())
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    assert dmoe_main(["import", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    assert dmoe_main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_text() == (tmp_path / "hf" / name).read_text(), name
    back = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (back["bos_token_id"], back["eos_token_id"]) == (1, 2)  # the source's, not dmoe's 0
    ids = list("héllo".encode())
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    capsys.readouterr()
    assert dmoe_main(["generate", str(tmp_path / "run"), "--prompt", "héllo",
                      "--max-new-tokens", "12", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["prompt_ids"] == ids and printed["new_ids"] == want.tolist()


def test_head_dim_option():
    """model.head_dim (Qwen3): qkv is (H + 2G) * R wide, proj takes H * R, rotary uses R."""
    from dmoe.config import ConfigError
    from dmoe.model.transformer import MoETransformer

    cfg = load_config(None, ["--model.d_model=30", "--model.n_heads=4", "--model.n_kv_heads=2",
                             "--model.head_dim=12", "--model.vocab_size=32", "--model.seq_len=8"])
    model = MoETransformer(cfg)
    attn = model.blocks[0].attn
    assert attn.qkv.weight.shape == (8 * 12, 30) and attn.proj.weight.shape == (30, 4 * 12)
    assert model.rope_cos.shape == (8, 12)
    assert model(torch.zeros(1, 8, dtype=torch.long)).logits.shape == (1, 8, 32)
    with pytest.raises(ConfigError, match=r"model.d_model \(30\) must be divisible by model.n_heads"):
        load_config(None, ["--model.d_model=30", "--model.n_heads=4"])
    with pytest.raises(ConfigError, match=r"model.head_dim \(-1\) must be >= 0"):
        load_config(None, ["--model.head_dim=-1"])
    with pytest.raises(ConfigError, match=r"model.head_dim, or model.d_model / model.n_heads: 7\) "
                                          "must be even"):
        load_config(None, ["--model.head_dim=7"])
