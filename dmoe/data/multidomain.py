"""The built-in multi-domain corpus (data.builtin=multidomain), found at run time on any
Debian/Ubuntu machine with Python; each document labelled with its domain:

    code        Python's standard library source (*.py)
    reference   Python's own documentation prose (pydoc_data.topics, one document a topic)
    legal       license texts: /usr/share/common-licenses/* and /usr/share/doc/*/copyright
    changelog   Debian package changelogs: /usr/share/doc/*/changelog*(.gz)

Each source file contributes its first FILE_HEAD characters, cut at line ends into
documents of about CHUNK characters (named "domain/path#i"). Balanced by bytes (= tokens under the byte tokenizer): each domain is capped at the
smallest domain's size or at max_bytes / n_domains, whichever is less. Documents are taken
in an order hashed from their names, so a cap samples the source evenly instead of taking
its alphabetical head. The validation split is the usual per-document hash rule
(dmoe.data.corpus.is_validation), applied within every domain. A source missing on this
machine costs one warning line naming the domain; the others are still balanced.
No communication.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .corpus import Document

log = logging.getLogger(__name__)

DOMAINS = ("code", "reference", "legal", "changelog")
FILE_HEAD, CHUNK = 32_000, 4_000  # characters read per source file; per document
VERSION = 1  # in the prepared data's source key: a change here prepares the data again
Source = Callable[[], list[tuple[str, Callable[[], str]]]]  # -> [(name, read text)]


def _hash_order(items: list[tuple[str, Callable[[], str]]]) -> list:
    return sorted(items, key=lambda item: hashlib.sha1(item[0].encode()).digest())


def _read_text(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8")


def _files(paths, root: Path) -> list[tuple[str, Callable[[], str]]]:
    """(name relative to root's parent, reader): names, hence the order and the validation
    split, do not depend on where this machine keeps the files."""
    return [(str(p.relative_to(root.parent)), (lambda p=p: _read_text(p)))
            for p in paths if p.is_file()]


@dataclass
class Sources:
    """Where each domain's text lives (tests point these at small fixtures)."""

    stdlib: Path = field(default_factory=lambda: Path(sysconfig.get_paths()["stdlib"]))
    licenses: Path = Path("/usr/share/common-licenses")
    doc: Path = Path("/usr/share/doc")
    topics: dict | None = None  # reference prose; None: pydoc_data.topics

    def code(self) -> list:
        if not self.stdlib.is_dir():
            return []
        return _files((p for p in sorted(self.stdlib.rglob("*.py"))
                       if "site-packages" not in p.parts and "test" not in p.parts), self.stdlib)

    def reference(self) -> list:
        topics = self.topics
        if topics is None:
            try:
                from pydoc_data.topics import topics
            except ImportError:
                return []
        return [(f"topic/{k}", (lambda v=v: v)) for k, v in sorted(topics.items())]

    def legal(self) -> list:
        found = _files(sorted(self.licenses.glob("*")), self.licenses) if self.licenses.is_dir() else []
        if self.doc.is_dir():
            found += _files(sorted(self.doc.glob("*/copyright")), self.doc)
        return found

    def changelog(self) -> list:
        if not self.doc.is_dir():
            return []
        return _files(sorted(self.doc.glob("*/changelog*")), self.doc)


def chunks(text: str, size: int) -> list[str]:
    """`text` cut at line ends into pieces of at most about `size` characters."""
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        if cur and n + len(line) > size:
            out.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += len(line)
    if cur:
        out.append("".join(cur))
    return out


def _take(items: list, budget: int, domain: str) -> Iterator[Document]:
    """Readable, non-empty sources in hash order until `budget` bytes: the head
    (FILE_HEAD chars) of each, cut into CHUNK-sized documents, so that one huge file
    cannot fill a domain and the per-document validation split has many documents."""
    used = 0
    for name, read in _hash_order(items):
        try:
            text = read()[:FILE_HEAD]
        except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
            continue
        for i, piece in enumerate(chunks(text, CHUNK)):
            if used >= budget:
                return
            if not piece.strip():
                continue
            piece = piece.encode()[: budget - used].decode("utf-8", errors="ignore")
            used += len(piece.encode())
            yield Document(f"{domain}/{name}#{i}", piece, domain)


def multidomain_documents(max_bytes: int, keep: list[str] | tuple = (),
                          sources: Sources | None = None) -> list[Document]:
    """Every available domain's documents, balanced (see the module doc); `keep` filters
    the domains after balancing, so a one-domain corpus holds what the mix holds of it."""
    sources = sources or Sources()
    unknown = sorted(set(keep) - set(DOMAINS))
    if unknown:
        raise ValueError(f"data.domains ({unknown}) must be among {list(DOMAINS)}")
    found = {d: getattr(sources, d)() for d in DOMAINS}
    for domain in DOMAINS:
        if not found[domain]:
            log.warning("multidomain corpus: domain %r absent on this machine (no source found)", domain)
    found = {d: items for d, items in found.items() if items}
    if not found:
        raise ValueError("data.builtin=multidomain: none of the domains' sources exist here")
    budget = max_bytes // len(found)
    docs = {d: list(_take(items, budget, d)) for d, items in found.items()}
    cap = min(sum(len(doc.text.encode()) for doc in ds) for ds in docs.values())
    return [doc for domain, ds in docs.items() if not keep or domain in keep
            for doc in _cap(ds, cap)]


def _cap(docs: list[Document], cap: int) -> Iterator[Document]:
    """The first `cap` bytes of a domain's documents, in their order (the last one cut)."""
    used = 0
    for doc in docs:
        if used >= cap:
            return
        text = doc.text.encode()[: cap - used].decode("utf-8", errors="ignore")
        used += len(text.encode())
        yield Document(doc.name, text, doc.domain)
