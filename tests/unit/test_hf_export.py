"""`dmoe export --format hf`: a preset trained by dmoe (its architecture at a tiny size, a
real checkpoint saved by the training save) loads in transformers with no missing or
unexpected weights, gives dmoe's logits, and transformers' greedy generate gives the
tokens `dmoe generate` gives. Tokenizers (byte and BPE) load through AutoTokenizer."""
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

from dmoe.cli import main as dmoe_main
from dmoe.data.tokenizer import BPETokenizer, ByteTokenizer
from dmoe.model.from_checkpoint import model_from_checkpoint
from dmoe.model.generate import generate
from tests.tiny_runs import TEXT, byte_batch, train_preset

pytest.importorskip("transformers")

TOL = 1e-5
PRESETS = {"mixtral-tiny": ("mixtral", "MixtralForCausalLM"),
           "qwen2-moe-tiny": ("qwen2_moe", "Qwen2MoeForCausalLM"),
           "qwen3-moe-tiny": ("qwen3_moe", "Qwen3MoeForCausalLM")}


def load_hf(out: Path):
    """from_pretrained, failing on any missing / unexpected / mismatched weight or warning."""
    from transformers import AutoModelForCausalLM

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    finally:
        hf_logger.removeHandler(handler)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    messages = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    assert not messages, messages
    return model.eval()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_trained_preset_round_trip_into_transformers(tmp_path, preset, capsys):
    from transformers import AutoTokenizer

    ckpt, loss = train_preset(tmp_path, preset)
    assert loss < 3.5  # it learned something (uniform over bytes: 5.55)
    assert dmoe_main(["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--format", "hf"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["architectures"][0]) == PRESETS[preset]
    hf = load_hf(tmp_path / "hf")
    model = model_from_checkpoint(str(ckpt))
    x, _ = byte_batch(999, rows=2)
    with torch.no_grad():
        diff = float((hf(x).logits - model(x).logits).abs().max())
    print(f"{preset} -> {config['model_type']}: max |logits diff| {diff:.2e}")
    assert diff <= TOL

    prompt = "import "
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok.encode(prompt)
    assert ids == ByteTokenizer().encode(prompt).tolist()
    with torch.no_grad():
        hf_new = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
    ours = generate(model, ids, 24, stop_ids=(0,))
    assert hf_new.tolist() == ours
    capsys.readouterr()
    assert dmoe_main(["generate", str(tmp_path / "run"), "--prompt", prompt,
                      "--max-new-tokens", "24", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["new_ids"] == ours and printed["text"] == tok.decode(hf_new)
    print(f"{preset}: greedy {prompt!r} -> {printed['text']!r} (dmoe == transformers)")


def test_sampling_is_seeded_and_top_k_bounded(tmp_path):
    ckpt, _ = train_preset(tmp_path, "mixtral-tiny", steps=10)
    model = model_from_checkpoint(str(ckpt))
    ids = ByteTokenizer().encode("import ").tolist()
    a = generate(model, ids, 16, temperature=1.0, top_k=3, seed=5)
    assert a == generate(model, ids, 16, temperature=1.0, top_k=3, seed=5)
    assert generate(model, ids, 16) == generate(model, ids, 16)  # greedy: deterministic
    with torch.no_grad():  # every sampled token is among the 3 likeliest at its step
        logits = model(torch.tensor([ids + a])).logits[0, len(ids) - 1:-1]
    top3 = logits.topk(3, dim=-1).indices
    assert all(t in row for t, row in zip(a, top3.tolist()))


def test_byte_tokenizer_ids_are_utf8_bytes(tmp_path):
    from transformers import AutoTokenizer

    from dmoe.hf.tokenizer import byte_tokenizer_json

    (tmp_path / "tokenizer.json").write_text(byte_tokenizer_json())
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    tok = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["hello world", "  héllo wörld ✓ 日本語\n\ttabs", "Ā and \x00 NUL", "🙂 emoji", ""]:
        ids = tok.encode(text)
        assert ids == ByteTokenizer().encode(text).tolist(), text
        assert tok.decode(ids) == text


def test_bpe_tokenizer_travels(tmp_path):
    from transformers import AutoTokenizer

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    text = TEXT.decode("utf-8", errors="ignore")
    bpe = BPETokenizer.train([text], 300, data_dir / "tokenizer.json")
    train_preset(tmp_path, "qwen3-moe-tiny", ["--data.tokenizer=bpe", f"--data.data_dir={data_dir}",
                                               f"--model.vocab_size={bpe.vocab_size}"], steps=2)
    assert dmoe_main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for sample in ["def main(argv):\n    return 0", "Mixture-of-Experts, héllo"]:
        assert tok.encode(sample) == bpe.encode(sample).tolist()
        assert tok.decode(tok.encode(sample)) == bpe.decode(bpe.encode(sample))
    load_hf(tmp_path / "hf")


def test_sharded_export_and_dmoe_format(tmp_path):
    train_preset(tmp_path, "qwen2-moe-tiny", steps=2)
    assert dmoe_main(["export", str(tmp_path / "run"), str(tmp_path / "hf"),
                      "--max-shard-size", "100KB", "--dtype", "bfloat16"]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / "hf" / f).is_file() for f in files)
    hf = load_hf(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16
    assert dmoe_main(["export", str(tmp_path / "run"), str(tmp_path / "m.safetensors"),
                      "--format", "dmoe"]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert "blocks.0.ffn.experts.w1" in set(f.keys()) and f.metadata()["format"] == "dmoe-export/1"
