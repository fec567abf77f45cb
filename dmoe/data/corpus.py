"""Text sources: the built-in corpus (this Python's own standard library source, docs and
license texts, present on every machine with Python) or the user's files and directories.

Documents come in a deterministic order; each is assigned to train or validation by a
hash of its name, so the held-out split does not move when files are added elsewhere.
"""
from __future__ import annotations

import hashlib
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".py", ".txt", ".rst", ".md", ".yaml", ".yml", ".json", ".toml", ".cfg", ".c", ".h", ""}


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    domain: str  # top-level source, e.g. "stdlib" or the user path it came from


def builtin_roots() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [stdlib]


def _iter_files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in TEXT_SUFFIXES and "site-packages" not in path.parts:
            yield path


def iter_documents(paths: list[str], max_bytes: int) -> Iterator[Document]:
    """Yield documents until max_bytes of text; user paths when given, else the stdlib."""
    roots = [Path(p).expanduser() for p in paths] or builtin_roots()
    total = 0
    for root in roots:
        if not root.exists():
            raise FileNotFoundError(f"data.paths: {root} does not exist")
        for path in _iter_files(root):
            # domain label: the source directory given by the user; in the built-in corpus,
            # the stdlib package a file belongs to ("stdlib" for top-level modules)
            rel = path.relative_to(root).parts if root.is_dir() else (path.name,)
            domain = root.name if paths else (f"stdlib/{rel[0]}" if len(rel) > 1 else "stdlib")
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            yield Document(str(path.relative_to(root) if root.is_dir() else path.name), text, domain)
            total += len(text)
            if total >= max_bytes:
                return


def is_validation(doc_name: str, val_fraction: float) -> bool:
    digest = hashlib.sha1(doc_name.encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < val_fraction
