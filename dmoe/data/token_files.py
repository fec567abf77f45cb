"""Tokenized corpus on disk as memory-mapped uint16 files (samplers: dmoe.data.sampler).

Layout of a prepared data directory:
    meta.json         tokenizer, vocab size, token counts, source description
    train.bin         uint16 tokens of the training documents, concatenated
    val.bin           uint16 tokens of the held-out documents
    tokenizer.json    (bpe only)
Preparation runs on one rank (the others wait at a barrier); every rank then maps the
same files read-only.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmoe.config import DataConfig

from .corpus import is_validation, iter_documents
from .tokenizer import BPETokenizer, ByteTokenizer

log = logging.getLogger(__name__)
EOT_BYTE = 0  # document separator (NUL never occurs in text)


def _source_key(cfg: DataConfig) -> dict:
    key = {"format": 2, "paths": list(cfg.paths), "tokenizer": cfg.tokenizer, "bpe_vocab_size": cfg.bpe_vocab_size,
           "val_fraction": cfg.val_fraction, "max_corpus_mb": cfg.max_corpus_mb}
    if not cfg.paths and cfg.builtin != "stdlib":  # the default's key (and its data) unchanged
        from .multidomain import VERSION

        key.update(builtin=cfg.builtin, domains=list(cfg.domains), corpus_version=VERSION)
    return key


def load_documents(cfg: DataConfig) -> list:
    """The documents cfg names: its paths, else the chosen built-in corpus."""
    max_bytes = int(cfg.max_corpus_mb * 1e6)
    if not cfg.paths and cfg.builtin == "multidomain":
        from .multidomain import multidomain_documents

        return multidomain_documents(max_bytes, cfg.domains)
    return list(iter_documents(cfg.paths, max_bytes))


def prepare(cfg: DataConfig) -> Path:
    """Tokenize the corpus into cfg.data_dir unless an identical preparation is there."""
    out = Path(cfg.data_dir)
    meta_path = out / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("source") == _source_key(cfg):
        return out
    out.mkdir(parents=True, exist_ok=True)
    docs = load_documents(cfg)
    if not docs:
        raise ValueError(f"data.paths ({cfg.paths}) holds no readable text")
    tok = ByteTokenizer()
    if cfg.tokenizer == "bpe":
        tok = BPETokenizer.train((d.text for d in docs), cfg.bpe_vocab_size, out / "tokenizer.json")
    domains = sorted({d.domain for d in docs})
    domain_id = {name: i for i, name in enumerate(domains)}
    splits = {"train": [], "val": []}
    index = {"train": [], "val": []}  # per document: (first token, domain id)
    offset = {"train": 0, "val": 0}
    for doc in docs:
        split = "val" if is_validation(doc.name, cfg.val_fraction) else "train"
        ids = tok.encode(doc.text)
        index[split].append((offset[split], domain_id[doc.domain]))
        splits[split] += [ids, np.array([EOT_BYTE], dtype=np.uint16)]
        offset[split] += ids.size + 1
    per_domain = {split: {domains[d]: int(n) for d, n in _domain_tokens(index[split], offset[split])}
                  for split in splits}
    counts = {}
    for split, parts in splits.items():
        if not parts:
            raise ValueError(f"data.val_fraction ({cfg.val_fraction}) leaves the {split} split empty")
        tokens = np.concatenate(parts)
        tmp = out / f"{split}.bin.tmp"
        tokens.tofile(tmp)
        tmp.replace(out / f"{split}.bin")
        np.save(out / f"{split}.idx.npy", np.asarray(index[split], dtype=np.int64))
        counts[split] = int(tokens.size)
    meta = {"source": _source_key(cfg), "vocab_size": tok.vocab_size, "tokens": counts,
            "documents": len(docs), "domains": domains,
            "documents_per_split": {k: len(v) for k, v in index.items()},
            "tokens_per_domain": per_domain}
    meta_path.write_text(json.dumps(meta, indent=2))
    log.info("prepared %d documents: %d train / %d val tokens in %s",
             len(docs), counts["train"], counts["val"], out)
    return out


def _domain_tokens(index: list, total: int) -> list[tuple[int, int]]:
    """(domain id, tokens incl. separators) of one split's document index."""
    sizes: dict[int, int] = {}
    ends = [start for start, _ in index[1:]] + [total]
    for (start, dom), end in zip(index, ends):
        sizes[dom] = sizes.get(dom, 0) + end - start
    return sorted(sizes.items())


@dataclass
class TokenData:
    train: np.memmap
    val: np.memmap
    vocab_size: int
    domains: tuple = ()  # domain names; a document's label indexes this
    index: dict | None = None  # split -> int64 [documents, 2]: (first token, domain id)

    @classmethod
    def open(cls, data_dir: Path) -> "TokenData":
        meta = json.loads((data_dir / "meta.json").read_text())
        mm = lambda s: np.memmap(data_dir / f"{s}.bin", dtype=np.uint16, mode="r")  # noqa: E731
        index = {s: np.load(data_dir / f"{s}.idx.npy") for s in ("train", "val")
                 if (data_dir / f"{s}.idx.npy").exists()}
        return cls(mm("train"), mm("val"), meta["vocab_size"], tuple(meta.get("domains", ())), index or None)

    def domain_of(self, split: str, positions: np.ndarray) -> np.ndarray:
        """Domain id of the document holding each token position (for routing analysis)."""
        starts, labels = self.index[split][:, 0], self.index[split][:, 1]
        return labels[np.searchsorted(starts, positions, side="right") - 1]

    def domain_tokens(self, split: str, domain: int) -> np.ndarray:
        """The tokens of one domain's documents in a split, concatenated in order."""
        arr = self.val if split == "val" else self.train
        starts, labels = self.index[split][:, 0], self.index[split][:, 1]
        ends = np.append(starts[1:], len(arr))
        parts = [arr[a:b] for a, b, d in zip(starts, ends, labels) if d == domain]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
