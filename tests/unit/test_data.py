import json

import numpy as np
import pytest

from dmoe.config import DataConfig
from dmoe.data.corpus import is_validation, iter_documents
from dmoe.data.sampler import sample_batch
from dmoe.data.token_files import TokenData, prepare
from dmoe.data.tokenizer import ByteTokenizer


@pytest.fixture
def text_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"doc{i:02d}.txt").write_text(f"document {i}: " + "the quick brown fox " * (i + 5))
    return src


def test_builtin_corpus_is_the_stdlib():
    docs = list(iter_documents([], max_bytes=200_000))
    assert docs and all(d.domain == "stdlib" or d.domain.startswith("stdlib/") for d in docs)
    by_name = {d.name: d.domain for d in docs}
    assert any(dom.startswith("stdlib/") for dom in by_name.values())
    assert all(by_name[n] == "stdlib" for n in by_name if "/" not in n)
    assert any(d.name.endswith(".py") for d in docs)
    assert sum(len(d.text) for d in docs) >= 200_000


def test_prepare_byte_split_and_reuse(text_dir, tmp_path):
    cfg = DataConfig(paths=[str(text_dir)], data_dir=str(tmp_path / "out"), val_fraction=0.2)
    out = prepare(cfg)
    data = TokenData.open(out)
    names = sorted(p.name for p in text_dir.iterdir())
    n_val = sum(is_validation(n, 0.2) for n in names)
    assert 0 < n_val < len(names)
    total = sum(len(p.read_bytes()) + 1 for p in text_dir.iterdir())  # + separator each
    assert len(data.train) + len(data.val) == total and data.vocab_size == 256
    first = (out / "train.bin").stat().st_mtime_ns
    prepare(cfg)  # identical source: not redone
    assert (out / "train.bin").stat().st_mtime_ns == first
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == len(names)


def test_sample_batch_is_a_pure_function_of_seed_step_rank(text_dir, tmp_path):
    data = TokenData.open(prepare(DataConfig(paths=[str(text_dir)], data_dir=str(tmp_path / "o"))))
    x1, y1 = sample_batch(data.train, 4, 16, seed=1, step=3, rank=0)
    x2, y2 = sample_batch(data.train, 4, 16, seed=1, step=3, rank=0)
    x3, _ = sample_batch(data.train, 4, 16, seed=1, step=3, rank=1)
    assert (x1 == x2).all() and (y1 == y2).all() and not (x1 == x3).all()
    assert (x1[:, 1:] == y1[:, :-1]).all()  # targets are inputs shifted by one


def test_bpe_tokenizer_trains_and_round_trips(text_dir, tmp_path):
    cfg = DataConfig(paths=[str(text_dir)], data_dir=str(tmp_path / "bpe"), tokenizer="bpe",
                     bpe_vocab_size=300)
    out = prepare(cfg)
    from dmoe.data.tokenizer import BPETokenizer

    tok = BPETokenizer(out / "tokenizer.json")
    assert 256 < tok.vocab_size <= 300
    ids = tok.encode("the quick brown fox")
    assert tok.decode(ids) == "the quick brown fox" and len(ids) < len("the quick brown fox")
    assert TokenData.open(out).vocab_size == tok.vocab_size


def test_byte_tokenizer_round_trip_and_missing_path(tmp_path):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo")) == "héllo"
    with pytest.raises(FileNotFoundError, match="data.paths"):
        list(iter_documents([str(tmp_path / "missing")], 100))
    assert np.all(tok.encode("a") == [97])


def test_domain_labels_per_source_directory(tmp_path):
    roots = []
    for name, word in (("law", "contract "), ("bio", "protein ")):
        root = tmp_path / name
        root.mkdir()
        for i in range(15):
            (root / f"{name}{i}.txt").write_text(word * (10 + i))
        roots.append(str(root))
    data = TokenData.open(prepare(DataConfig(paths=roots, data_dir=str(tmp_path / "o"), val_fraction=0.3)))
    assert data.domains == ("bio", "law")
    for split, tokens in (("train", data.train), ("val", data.val)):
        text = np.asarray(tokens).astype(np.uint8).tobytes().decode()
        pos = np.arange(0, len(tokens), 7)
        labels = data.domain_of(split, pos)
        for p_, label in zip(pos, labels):
            if tokens[p_] != 0:  # a document byte, not a separator
                word = "protein" if data.domains[label] == "bio" else "contract"
                start = text.rfind("\x00", 0, p_) + 1
                assert text[start:].startswith(word)


def test_dmoe_data_prepare_command(text_dir, tmp_path, capsys):
    from dmoe.cli import main

    out = tmp_path / "cli"
    assert main(["data", "prepare", str(text_dir), "--out", str(out), "--data.val_fraction=0.2"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["domains"] == ["src"] and meta["documents"] == 40
    assert "train" in capsys.readouterr().out
    assert main(["data", "prepare", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "data.paths" in capsys.readouterr().err
