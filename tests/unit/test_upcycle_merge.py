"""Sparse upcycling and Branch-Train-MiX (dmoe.model.upcycle, `dmoe upcycle` / `dmoe merge`):
an upcycled MoE whose experts are all copies computes the dense model's output (top-k > 1,
renormalised gates, dropless), and so does a merge of N copies of one dense model; float64."""
import pytest
import torch

from dmoe.checkpoint.whole import write_run_dir
from dmoe.cli import main as dmoe_main
from dmoe.config import ConfigError, load_config
from dmoe.model.from_checkpoint import model_from_checkpoint
from dmoe.model.transformer import MoETransformer
from dmoe.model.upcycle import merge, moe_config, upcycle

DROPLESS = ["--moe.capacity_factor=null", "--moe.eval_capacity_factor=null"]


def _dense_cfg(activation="gelu", extra=()):
    return load_config(None, ["--model.vocab_size=32", "--model.d_model=16", "--model.n_layers=3",
                              "--model.n_heads=2", "--model.seq_len=12", "--model.ffn_dim=24",
                              f"--model.mlp_activation={activation}", "--moe.first_dense_layers=3",
                              "--model.norm=rmsnorm", *extra])


def _model(cfg, tensors=None, seed=0):
    torch.manual_seed(seed)
    model = MoETransformer(cfg).double()
    for module in model.modules():
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = torch.float64
    with torch.no_grad():
        for name, p in model.named_parameters():
            if tensors is None:
                p.add_(0.05 * torch.randn_like(p))  # norms away from 1
            else:
                p.copy_(tensors[name])
    return model.eval()


def _tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _logits(model, seed=5):
    x = torch.randint(0, 32, (3, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("experts,k,every", [(4, 2, 1), (8, 4, 1), (4, 2, 2), (3, 3, 1)])
def test_upcycled_copies_reproduce_the_dense_model(activation, experts, k, every):
    dense = _model(_dense_cfg(activation))
    cfg = moe_config(dense.cfg, experts, k, every, DROPLESS)
    moe = _model(cfg, upcycle(_tensors(dense), cfg, seed=1))
    n_moe = sum(type(b.ffn).__name__ == "MoELayer" for b in moe.blocks)
    assert n_moe == (3 if every == 1 else 1)
    diff = float((_logits(moe) - _logits(dense)).abs().max())
    assert diff < 1e-12, diff


def test_upcycled_top1_is_the_gate_times_the_dense_mlp_not_the_dense_model():
    dense = _model(_dense_cfg())
    cfg = moe_config(dense.cfg, 4, 1, 1, DROPLESS)
    moe = _model(cfg, upcycle(_tensors(dense), cfg, seed=1))
    assert float((_logits(moe) - _logits(dense)).abs().max()) > 1e-6
    x = torch.randn(5, 16, dtype=torch.float64)
    block = moe.blocks[0].ffn
    with torch.no_grad():
        gate = block.router(x).gate_TK
        want = gate * dense.blocks[0].ffn(x)
        assert torch.allclose(block(x)[0], want, atol=1e-12)


def test_upcycle_noise_and_router():
    dense = _model(_dense_cfg())
    cfg = moe_config(dense.cfg, 4, 2, 1, DROPLESS)
    t = upcycle(_tensors(dense), cfg, noise=0.1, seed=3)
    w1, fc1 = t["blocks.0.ffn.experts.w1"], dense.blocks[0].ffn.fc1.weight.detach()
    rel = (w1 - fc1.T).std() / fc1.std()
    assert 0.07 < float(rel) < 0.13 and not torch.equal(w1[0], w1[1])
    assert t["blocks.0.ffn.router.gate.weight"].shape == (4, 16)
    assert torch.equal(t["tok_emb.weight"], dense.tok_emb.weight.detach())
    again = upcycle(_tensors(dense), cfg, noise=0.1, seed=3)
    assert all(torch.equal(again[n], t[n]) for n in t)  # seeded


@pytest.mark.parametrize("n,k", [(3, 2), (2, 1), (4, 4)])
def test_merging_copies_of_one_dense_model_reproduces_it(n, k):
    dense = _model(_dense_cfg("swiglu"))
    cfg = moe_config(dense.cfg, n, k, 1, DROPLESS)
    merged = _model(cfg, merge([_tensors(dense)] * n, cfg))
    diff = float((_logits(merged) - _logits(dense)).abs().max())
    if k == 1:  # top-1 gate is the router probability: not the dense output (see upcycle)
        assert diff > 1e-6
    else:
        assert diff < 1e-12, diff


def test_merge_puts_model_n_mlp_in_expert_n_and_averages_the_rest():
    models = [_model(_dense_cfg(), seed=s) for s in range(3)]
    cfg = moe_config(models[0].cfg, 3, 2, 2, DROPLESS)  # block 1 MoE; 0 and 2 stay dense
    t = merge([_tensors(m) for m in models], cfg)
    for e, m in enumerate(models):
        assert torch.equal(t["blocks.1.ffn.experts.w1"][e], m.blocks[1].ffn.fc1.weight.T)
        assert torch.equal(t["blocks.1.ffn.experts.w2"][e], m.blocks[1].ffn.fc2.weight.T)
    mean = sum(m.blocks[0].ffn.fc1.weight for m in models) / 3
    assert torch.allclose(t["blocks.0.ffn.fc1.weight"], mean, atol=1e-15)
    assert torch.allclose(t["tok_emb.weight"], sum(m.tok_emb.weight for m in models) / 3,
                          atol=1e-15)
    with pytest.raises(ConfigError, match="must equal the number of merged models"):
        merge([_tensors(m) for m in models[:2]], cfg)


def test_config_errors_name_the_fields():
    with pytest.raises(ConfigError, match="model.bias is true"):
        moe_config(_dense_cfg(extra=["--model.bias=true"]), 4, 2)
    with pytest.raises(ConfigError, match=r"moe.expert_ffn_dim \(8\)"):
        moe_config(_dense_cfg(), 4, 2, 1, ["--moe.expert_ffn_dim=8"])
    with pytest.raises(ConfigError, match="moe.top_k"):
        moe_config(_dense_cfg(), 4, 5)


def _dense_run(tmp_path, name, seed, extra=()):
    dense = _model(_dense_cfg(extra=extra), seed=seed)
    cfg = dense.cfg
    return write_run_dir(tmp_path / name, cfg, _tensors(dense)), dense


def test_commands_write_ordinary_checkpoints(tmp_path, capsys):
    (run_a, dense), (run_b, _) = _dense_run(tmp_path, "a", 0), _dense_run(tmp_path, "b", 1)
    assert dmoe_main(["upcycle", str(run_a), str(tmp_path / "up"), "--num-experts", "4",
                      "--top-k", "2", *DROPLESS]) == 0
    up = model_from_checkpoint(str(tmp_path / "up"), torch.float64)
    assert up.cfg.moe.num_experts == 4 and up.cfg.train.resume == "auto"
    assert float((_logits(up) - _logits(dense)).abs().max()) < 1e-6  # fp32 on disk
    assert dmoe_main(["merge", str(run_a), str(run_b), str(tmp_path / "btx"), *DROPLESS]) == 0
    assert model_from_checkpoint(str(tmp_path / "btx")).cfg.moe.top_k == 2
    # one line, exit 2: an output that exists, two architectures
    assert dmoe_main(["merge", str(run_a), str(run_b), str(tmp_path / "btx")]) == 2
    assert "already exists" in capsys.readouterr().err
    run_c, _ = _dense_run(tmp_path, "c", 2, ["--model.ffn_dim=16"])
    assert dmoe_main(["merge", str(run_a), str(run_c), str(tmp_path / "x")]) == 2
    assert "model.ffn_dim (16) differs" in capsys.readouterr().err
    assert dmoe_main(["upcycle", str(tmp_path / "up"), str(tmp_path / "y"), "--num-experts", "2",
                      "--top-k", "2"]) == 2
    assert "is not a dense MLP block" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
