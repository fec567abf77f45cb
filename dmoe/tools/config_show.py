"""The config schema and values for people: `dmoe config show` prints a resolved config as
YAML; `keys_help()` is the table of every key `dmoe train --help` ends with (type,
default, allowed values, and the description given in dmoe/config.py).

    dmoe config show                                  # the packaged default
    dmoe config show --config mixtral-tiny --moe.top_k=1
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

import yaml

from dmoe.config import DEFAULT_CONFIG, Config, ConfigError, load_config, presets
from dmoe.tools.help_format import HelpFormatter


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return "|".join("null" if a is type(None) else a.__name__ for a in args)
    return getattr(hint, "__name__", str(hint))


def _default_text(value) -> str:
    if value is None:
        return "null"
    if value == "" or value == []:
        return '""' if value == "" else "[]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def key_rows() -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description with allowed values) for every config key."""
    rows = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            text = f.metadata.get("help", "")
            if "choices" in f.metadata:
                text = f"{{{'|'.join(f.metadata['choices'])}}} {text}".strip()
            rows.append((f"{section.name}.{f.name}", _type_name(hints[f.name]), _default_text(default), text))
    return rows


def keys_help() -> str:
    """The table printed by `dmoe train --help`, one line per key, grouped by section."""
    rows = key_rows()
    wk, wt, wd = (max(len(r[i]) for r in rows) for i in range(3))
    out, section = [], None
    for key, kind, default, text in rows:
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            doc = (Config.__dataclass_fields__[section].default_factory.__doc__ or "").strip()
            out.append(f"\n{section}: {doc}")
        out.append(f"  --{key:<{wk}}  {kind:<{wt}}  {default:<{wd}}  {text}".rstrip())
    return "\n".join(out).lstrip("\n")


def show(config: str, overrides: list[str]) -> str:
    cfg = load_config(config, overrides)
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dmoe config", formatter_class=HelpFormatter,
        description="show the resolved config (YAML) of a config file or packaged preset plus "
                    "--section.key=value overrides",
        epilog=f"packaged presets: {', '.join(presets())}")
    parser.add_argument("action", choices=["show"], help="what to do")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="a YAML file, or a packaged preset's name")
    args, overrides = parser.parse_known_args(argv)
    try:
        sys.stdout.write(show(args.config, overrides))
    except ConfigError as err:
        sys.stderr.write(f"config error: {err}\n")
        return 2
    return 0
