"""dmoe: distributed Mixture-of-Experts training (expert, data and tensor parallel).

The public API, imported on first use (so `import dmoe` and `dmoe --help` stay fast):

    dmoe.MoELayer            the MoE FFN to put in your own model (dmoe.moe.layer)
    dmoe.CapacitySettings    its capacity options (defaults: factor 1.25 train, 2.0 eval)
    dmoe.shard_moe_layers    make every MoELayer in a module expert-parallel over a group
    dmoe.parallelize         TP then EP on a built MoETransformer, over dmoe's ProcessGroups
    dmoe.load_config         YAML file or packaged preset name + --section.key=value overrides
    dmoe.Config              the config schema (dataclasses)
    dmoe.MoETransformer      the model dmoe trains
    dmoe.__version__
"""
from __future__ import annotations

import importlib

_API = {
    "MoELayer": "dmoe.moe.layer",
    "CapacitySettings": "dmoe.moe.dispatcher",
    "shard_moe_layers": "dmoe.parallel.expert_parallel.apply",
    "parallelize": "dmoe.parallel.parallelize",
    "load_config": "dmoe.config",
    "Config": "dmoe.config",
    "ConfigError": "dmoe.config",
    "MoETransformer": "dmoe.model.transformer",
}

__all__ = ["CapacitySettings", "Config", "ConfigError", "MoELayer", "MoETransformer", "__version__",
           "load_config", "parallelize", "shard_moe_layers"]


def _version() -> str:
    """The installed distribution's version, else pyproject.toml's (a source checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dmoe")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        text = pyproject.read_text() if pyproject.exists() else ""
        found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
        return found.group(1) if found else "0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        value = _version()
    elif name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
    else:
        raise AttributeError(f"module 'dmoe' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
