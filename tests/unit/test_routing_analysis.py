"""Routing figures on synthetic routers (dmoe.analysis.stats), and the analysis of a tiny
model end to end (observer, per-domain loss, outputs)."""
import json

import numpy as np
import pytest
import torch

from dmoe.analysis import stats
from dmoe.analysis.collect import domain_windows, run_domains
from dmoe.analysis.report import analyze, write_outputs
from dmoe.config import load_config
from dmoe.data.token_files import TokenData
from dmoe.model.transformer import MoETransformer


def _random_router(rng, tokens, experts, k):
    """Each token: k distinct experts uniformly, independent of everything."""
    return np.argsort(rng.random((tokens, experts)), axis=1)[:, :k]


def test_nmi_zero_for_a_router_independent_of_domain():
    # every domain sends exactly the same number of tokens to each expert: I = 0 exactly
    domains = np.repeat(np.arange(4), 8 * 10)
    choices = np.tile(np.repeat(np.arange(8), 10), 4)[:, None]
    assert stats.nmi(domains, choices, 8)["nmi"] == pytest.approx(0.0, abs=1e-12)
    # a random router: zero within the plug-in bias (L-1)(E-1)/(2 T ln 2) bits
    rng = np.random.default_rng(0)
    t = 200_000
    labels = rng.integers(0, 4, t)
    fig = stats.nmi(labels, _random_router(rng, t, 8, 2), 8)
    assert fig["mi_bits"] < 5 * 3 * 7 / (2 * t * np.log(2))
    assert fig["nmi"] < 1e-3


@pytest.mark.parametrize("k", [1, 2])
def test_nmi_one_for_a_router_that_routes_by_domain(k):
    rng = np.random.default_rng(1)
    domains = rng.integers(0, 4, 5000)
    # domain d -> experts {k*d, ..., k*d + k-1} (4k experts, each serving one domain)
    choices = domains[:, None] * k + np.arange(k)[None, :]
    fig = stats.nmi(domains, choices, 4 * k)
    h = fig["h_label_bits"]
    assert fig["u"] == pytest.approx(1.0, abs=1e-12)  # the expert tells the domain
    assert fig["h_expert_bits"] == pytest.approx(h + np.log2(k), abs=1e-12)
    # top-1: NMI 1; top-k spreads each token over k experts (log2 k bits more in H(expert))
    assert fig["nmi"] == pytest.approx(2 * h / (2 * h + np.log2(k)), abs=1e-12)
    if k == 1:
        assert fig["nmi"] == pytest.approx(1.0, abs=1e-12)
    assert stats.shuffled_nmi(domains, choices, 4 * k) < 0.01


def test_nmi_matches_a_hand_computed_case():
    # labels 0,0,1,1 with experts 0,1,1,1: H(L)=1, H(E)=h(1/4), H(L,E)=1.5 bits
    fig = stats.nmi(np.array([0, 0, 1, 1]), np.array([[0], [1], [1], [1]]), 2)
    h_e = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))
    mi = 1 + h_e - 1.5
    assert fig["mi_bits"] == pytest.approx(mi) and fig["nmi"] == pytest.approx(mi / ((1 + h_e) / 2))


@pytest.mark.parametrize("experts,k", [(8, 1), (8, 2), (64, 4)])
def test_consecutive_reuse_of_a_random_router_is_the_chance_rate(experts, k):
    rng = np.random.default_rng(experts + k)
    b, s = 200, 256
    choices = _random_router(rng, b * s, experts, k).reshape(b, s, k)
    fig = stats.consecutive_reuse(choices, experts)
    assert fig["chance"] == pytest.approx(k / experts, rel=0.02)  # uniform: K/E
    # per pair the kept fraction has variance below k/E (1 - k/E) / k; 5 sigma
    sigma = np.sqrt(k / experts / k / fig["pairs"])
    assert abs(fig["rate"] - fig["chance"]) < 5 * sigma


def test_consecutive_reuse_chance_follows_skewed_usage_and_sticky_router_beats_it():
    rng = np.random.default_rng(3)
    p = np.array([0.5, 0.2, 0.2, 0.1])
    choices = rng.choice(4, size=(400, 200, 1), p=p)
    fig = stats.consecutive_reuse(choices, 4)
    assert fig["chance"] == pytest.approx((p ** 2).sum(), abs=0.01)
    assert abs(fig["rate"] - fig["chance"]) < 0.01
    sticky = np.repeat(choices[:, :1], 200, axis=1)  # every token keeps the first's expert
    assert stats.consecutive_reuse(sticky, 4)["rate"] == 1.0


def test_byte_token_classes_mark_keywords_as_words():
    text = b"def f(x1):\n    return x_def + 2"
    cls = stats.byte_token_classes(np.frombuffer(text, dtype=np.uint8))
    names = [stats.TOKEN_CLASSES[c] for c in cls]
    assert names[:3] == ["keyword"] * 3 and names[3] == "whitespace"
    assert names[text.index(b"return")] == "keyword"
    assert names[text.index(b"x_def") + 2] == "letter"  # `def` inside an identifier
    assert names[text.index(b"1")] == "digit" and names[text.index(b"(")] == "punctuation"
    assert list(stats.piece_token_classes(["Ġdef", "Ġx", "12", "!", " "])) == [4, 0, 1, 3, 2]


def test_top_tokens_lift_finds_the_token_an_expert_owns():
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 50, 20000)
    choices = rng.integers(0, 4, (20000, 1))
    choices[tokens == 7, 0] = 2
    tops = stats.top_tokens(tokens, choices, 4, 50)
    assert tops[2]["lift"][0][0] == 7 and tops[2]["lift"][0][1] > 3
    assert all(7 not in [t for t, _ in tops[e]["lift"][:1]] for e in (0, 1, 3))


def _data_dir(tmp_path, vocab=32, per_domain=(400, 300, 10)):
    """A prepared-data layout by hand: three domains of val documents (one too short)."""
    rng = np.random.default_rng(0)
    val, index = [], []
    for d, n in enumerate(per_domain):
        for half in (n // 2, n - n // 2):
            index.append((sum(len(v) for v in val), d))
            val.append(rng.integers(1, vocab, half).astype(np.uint16))
    tokens = np.concatenate(val)
    tokens.tofile(tmp_path / "val.bin")
    tokens.tofile(tmp_path / "train.bin")
    for split in ("val", "train"):
        np.save(tmp_path / f"{split}.idx.npy", np.asarray(index, dtype=np.int64))
    (tmp_path / "meta.json").write_text(json.dumps({
        "vocab_size": vocab, "domains": ["alpha", "beta", "tiny"],
        "source": {"tokenizer": "byte"}}))
    return TokenData.open(tmp_path)


def _tiny_model(extra=()):
    cfg = load_config(None, ["--model.vocab_size=32", "--model.d_model=16", "--model.n_layers=2",
                             "--model.n_heads=2", "--model.seq_len=16", "--moe.num_experts=4",
                             "--moe.every=1", "--moe.expert_ffn_dim=8", *extra])
    torch.manual_seed(0)
    return MoETransformer(cfg).eval()


def test_domain_windows_never_cross_the_domain_and_drop_short_domains(tmp_path):
    data = _data_dir(tmp_path)
    assert len(data.domain_tokens("val", 0)) == 400
    w = domain_windows(data.domain_tokens("val", 1), 16, 10_000)
    assert w.shape == (299 // 16, 17)
    assert (w[1:, 0] == w[:-1, -1]).all()  # targets continue into the next window's input
    model = _tiny_model()
    runs = run_domains(model, data, 10_000, batch_size=4)
    assert [r.name for r in runs] == ["alpha", "beta"]  # "tiny" has < 17 tokens
    assert all(layer.routing_observer is None for layer in (b.ffn for b in model.blocks))


def test_per_domain_loss_and_choices_match_a_direct_forward(tmp_path):
    data = _data_dir(tmp_path)
    model = _tiny_model()
    run = run_domains(model, data, 64, batch_size=3)[0]
    x = torch.from_numpy(domain_windows(data.domain_tokens("val", 0), 16, 64))
    with torch.no_grad():
        logits = model(x[:, :-1]).logits
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        router = model.blocks[1].ffn.router
        h = model.blocks[0](model.tok_emb(x[:, :-1]), (model.rope_cos, model.rope_sin))[0]
        h = h + model.blocks[1].attn(model.blocks[1].ln1(h), (model.rope_cos, model.rope_sin))
        idx = router(model.blocks[1].ln2(h).flatten(0, 1)).expert_idx_TK
    assert run.loss == pytest.approx(float(want), rel=1e-6)
    assert np.array_equal(run.choices[1].reshape(-1, 2), idx.numpy())


def test_analysis_outputs(tmp_path):
    data = _data_dir(tmp_path)
    result = analyze(run_domains(_tiny_model(), data, 10_000), 4, 32)
    assert set(result["loss"]) == {"alpha", "beta"} and len(result["layers"]) == 2
    layer = result["layers"][0]
    assert sum(layer["usage"]["alpha"]) == pytest.approx(1.0, abs=1e-5)
    assert 0 <= layer["domain"]["nmi"] <= 1 and len(layer["top_tokens"]) == 4
    written = write_outputs(result, tmp_path / "out")
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert json.loads((tmp_path / "out" / "routing.json").read_text())["layers"][1]["block"] == 1


def test_imported_hugging_face_model_is_analysed(tmp_path, capsys):
    """`dmoe analyze-routing` on an imported Mixtral: byte data re-encoded with the model's
    own tokenizer (here a byte-level one, so the ids are the bytes), every layer analysed."""
    pytest.importorskip("transformers")
    from dmoe.cli import main as dmoe_main
    from dmoe.hf.importer import import_hf
    from dmoe.hf.tokenizer import byte_tokenizer_json
    from tests.hf_models import save_tiny

    save_tiny("mixtral", tmp_path / "hf", vocab_size=256)
    (tmp_path / "hf" / "tokenizer.json").write_text(byte_tokenizer_json())
    import_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
    for name, word in (("prose", "the cat sat on the mat. "), ("code", "def f(x): return x\n")):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(30):
            (tmp_path / "src" / name / f"{i}.txt").write_text(word * (20 + i))
    data = tmp_path / "data"
    assert dmoe_main(["data", "prepare", str(tmp_path / "src" / "prose"),
                      str(tmp_path / "src" / "code"), "--out", str(data),
                      "--data.val_fraction=0.3"]) == 0
    out = tmp_path / "analysis"
    assert dmoe_main(["analyze-routing", str(tmp_path / "run"), "--data", str(data), "--out",
                      str(out), "--tokens-per-domain", "256"]) == 0
    result = json.loads((out / "routing.json").read_text())
    assert result["domains"] == ["code", "prose"]
    n_layers = load_config(str(tmp_path / "run" / "config.yaml")).model.n_layers
    assert [lay["block"] for lay in result["layers"]] == list(range(n_layers))
    assert (out / "heatmap_block0.png").is_file() and "NMI domain" in capsys.readouterr().out


def test_heatmap_stays_readable_at_64_experts(tmp_path):
    from dmoe.analysis.report import heatmap

    usage = np.random.default_rng(0).dirichlet(np.ones(64), 4)
    layer = {"block": 0, "usage": {d: list(u) for d, u in zip("abcd", usage)},
             "usage_all": list(usage.mean(0)), "domain": {"nmi": 0.1}}
    heatmap(layer, list("abcd"), tmp_path / "h.png")
    import matplotlib.image

    height, width = matplotlib.image.imread(tmp_path / "h.png").shape[:2]
    assert width <= 16 * 110 + 1 and height < width
