"""The built-in multi-domain corpus (dmoe.data.multidomain) on small fixtures: four
labelled domains, balanced by bytes, a per-domain validation split, a missing source
named in one warning line, and `dmoe data prepare --builtin multidomain`."""
import gzip
import json
import logging

import numpy as np
import pytest

from dmoe.cli import main as dmoe_main
from dmoe.config import DataConfig, load_config
from dmoe.data import multidomain
from dmoe.data.multidomain import Sources, chunks, multidomain_documents
from dmoe.data.token_files import TokenData, _source_key, prepare


def _lines(word, n):
    return "".join(f"{word} line {i} of the text\n" for i in range(n))


@pytest.fixture
def sources(tmp_path):
    stdlib, lic, doc = tmp_path / "lib", tmp_path / "licenses", tmp_path / "doc"
    (stdlib / "pkg").mkdir(parents=True)
    lic.mkdir()
    for i in range(12):
        (stdlib / f"mod{i}.py").write_text(_lines(f"def f{i}(): return", 60))
    (stdlib / "pkg" / "inner.py").write_text(_lines("import os", 30))
    for i in range(6):
        (lic / f"LIC-{i}").write_text(_lines("THE SOFTWARE IS PROVIDED AS IS", 40))
        pkg = doc / f"pkg{i}"
        pkg.mkdir(parents=True)
        (pkg / "copyright").write_text(_lines("Copyright holder", 30))
        (pkg / "changelog.Debian.gz").write_bytes(gzip.compress(_lines("  * fix bug", 80).encode()))
    topics = {f"topic{i}": _lines("The statement", 50) for i in range(20)}
    return Sources(stdlib=stdlib, licenses=lic, doc=doc, topics=topics)


def _sizes(docs):
    out = {}
    for d in docs:
        out[d.domain] = out.get(d.domain, 0) + len(d.text.encode())
    return out


def test_four_domains_balanced_by_bytes(sources):
    docs = multidomain_documents(10**9, sources=sources)
    sizes = _sizes(docs)
    assert set(sizes) == {"code", "reference", "legal", "changelog"}
    assert len(set(sizes.values())) == 1  # capped at the smallest domain
    assert all(d.name.startswith(f"{d.domain}/") for d in docs)
    root = str(sources.stdlib.parent)
    assert not any(root in d.name for d in docs)  # names (the split) do not depend on where
    assert any("changelog.Debian.gz" in d.name for d in docs)  # gzip read
    assert all(len(d.text) <= multidomain.CHUNK + 100 for d in docs)
    assert multidomain_documents(10**9, sources=sources) == docs  # deterministic


def test_budget_per_domain_is_max_bytes_over_domains(sources):
    sizes = _sizes(multidomain_documents(4000, sources=sources))
    assert set(sizes.values()) == {1000}


def test_missing_domain_is_one_warning_line(sources, tmp_path, caplog):
    sources.doc = tmp_path / "nowhere"
    with caplog.at_level(logging.WARNING):
        docs = multidomain_documents(10**9, sources=sources)
    assert set(_sizes(docs)) == {"code", "reference", "legal"}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["multidomain corpus: domain 'changelog' absent on this machine (no source found)"]


def test_one_domain_holds_what_the_mix_holds_of_it(sources):
    mix = [d for d in multidomain_documents(10**9, sources=sources) if d.domain == "legal"]
    assert multidomain_documents(10**9, ["legal"], sources=sources) == mix
    with pytest.raises(ValueError, match=r"data.domains \(\['poetry'\]\)"):
        multidomain_documents(10**9, ["poetry"], sources=sources)


def test_chunks_cut_at_line_ends():
    text = _lines("abc", 100)
    parts = chunks(text, 200)
    assert "".join(parts) == text and all(p.endswith("\n") for p in parts)
    assert max(len(p) for p in parts) <= 200


def test_prepare_multidomain_has_a_validation_split_per_domain(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(multidomain, "Sources", lambda: sources)
    cfg = DataConfig(builtin="multidomain", data_dir=str(tmp_path / "data"), val_fraction=0.3)
    data = TokenData.open(prepare(cfg))
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert data.domains == ("changelog", "code", "legal", "reference")
    assert all(meta["tokens_per_domain"]["val"][d] > 0 for d in data.domains)
    for d, name in enumerate(data.domains):  # domain_tokens agrees with domain_of
        starts = data.index["val"][data.index["val"][:, 1] == d, 0]
        assert (data.domain_of("val", starts) == d).all()
        assert len(data.domain_tokens("val", d)) == meta["tokens_per_domain"]["val"][name]
    total = sum(meta["tokens_per_domain"]["train"].values()) + sum(meta["tokens_per_domain"]["val"].values())
    assert total == len(data.train) + len(data.val)
    one = TokenData.open(prepare(DataConfig(builtin="multidomain", domains=["code"],
                                            data_dir=str(tmp_path / "code"), val_fraction=0.3)))
    assert one.domains == ("code",)
    assert np.array_equal(one.domain_tokens("val", 0), data.domain_tokens("val", 1))


def test_default_data_key_unchanged_and_config_checked():
    assert _source_key(DataConfig()) == {"format": 2, "paths": [], "tokenizer": "byte",
                                         "bpe_vocab_size": 2048, "val_fraction": 0.05,
                                         "max_corpus_mb": 16.0}
    assert load_config(None, ["--data.builtin=multidomain"]).data.builtin == "multidomain"
    with pytest.raises(ValueError, match=r"data.builtin \('poetry'\) must be one of"):
        load_config(None, ["--data.builtin=poetry"])


def test_data_prepare_command(sources, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(multidomain, "Sources", lambda: sources)
    assert dmoe_main(["data", "prepare", "--builtin", "multidomain", "--out", str(tmp_path / "d"),
                      "--data.val_fraction=0.3"]) == 0
    out = capsys.readouterr().out
    assert "4 domains: changelog, code, legal, reference" in out and "tokens per domain" in out
