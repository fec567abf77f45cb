"""`dmoe data prepare [PATH ...] [--builtin stdlib|multidomain] [--config F] [--data.key=value ...]`

Tokenizes text files/directories (each given path is one domain label), or the built-in
corpus when no path is given (--builtin multidomain: code, reference prose, legal text and
changelogs, balanced, each a domain: dmoe.data.multidomain), into the memory-mapped layout of dmoe.data.token_files, and
prints what it wrote. Training runs call the same `prepare` and reuse the result.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dmoe.config import ConfigError, load_config
from dmoe.tools.help_format import HelpFormatter, summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dmoe data prepare", description=summary(__doc__),
                                     formatter_class=HelpFormatter)
    parser.add_argument("action", choices=["prepare"], help="what to do")
    parser.add_argument("paths", nargs="*",
                        help="text files or directories (default: built-in corpus)")
    parser.add_argument("--config", default=None,
                        help="a YAML file or packaged config name for the data.* settings")
    parser.add_argument("--out", default=None, help="data directory (default: data.data_dir)")
    parser.add_argument("--builtin", choices=["stdlib", "multidomain"], default=None,
                        help="the built-in corpus when no path is given (= --data.builtin)")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        sys.stderr.write(f"config error: {err}\n")
        return 2
    if args.paths:
        cfg.data.paths = list(args.paths)
    if args.out:
        cfg.data.data_dir = args.out
    if args.builtin:
        cfg.data.builtin = args.builtin
    from dmoe.data.token_files import prepare

    try:
        out = prepare(cfg.data)
    except (FileNotFoundError, ValueError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    meta = json.loads((Path(out) / "meta.json").read_text())
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prepared {out}")
    for col in ("split", "documents", "tokens"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split in ("train", "val"):
        table.add_row(split, str(meta["documents_per_split"][split]), f"{meta['tokens'][split]:,}")
    console = Console()
    console.print(table)
    per_domain = meta.get("tokens_per_domain", {})
    if per_domain and len(meta["domains"]) <= 12:
        console.print("tokens per domain (train / val): " + ", ".join(
            f"{d} {per_domain['train'].get(d, 0):,} / {per_domain['val'].get(d, 0):,}"
            for d in meta["domains"]))
    console.print(f"tokenizer {cfg.data.tokenizer} (vocab {meta['vocab_size']}), "
                  f"{len(meta['domains'])} domains: {', '.join(meta['domains'][:12])}"
                  + (" ..." if len(meta["domains"]) > 12 else ""))
    return 0
