"""Installs anywhere: the configs ship inside the package, constraints.txt pins what the
tests ran with, `import dmoe` is light and exposes the public API."""
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import tomllib

import dmoe

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].split(";")[0].strip()
        if line:
            name, _, pin = line.partition("==")
            pins[name.lower()] = pin
    return pins


def test_configs_dir_is_the_package_copy():
    """One copy: the repo's configs/ is a link to dmoe/configs, which the wheel ships."""
    assert (REPO / "configs").is_symlink()
    assert (REPO / "configs").resolve() == (REPO / "dmoe" / "configs").resolve()
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["dmoe"]
    shipped = {p for g in globs for p in (REPO / "dmoe").glob(g)}
    assert shipped == set((REPO / "dmoe" / "configs").rglob("*.yaml")) and shipped


def test_constraints_pin_every_direct_dependency_at_the_tested_versions():
    pins = _pins()
    assert pins["torch"] == "2.13.0" and pins["deepspeed"] == "0.19.8" and pins["transformers"] == "5.23.0"
    direct = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["hf"]
    direct += (REPO / "requirements.txt").read_text().splitlines()
    for req in direct:
        name = re.split(r"[<>=!;\s\[#]", req.strip(), maxsplit=1)[0].lower()
        if name:
            assert name in pins, f"{name} is not pinned in constraints.txt"
    for name in ("deepspeed", "transformers", "numpy", "pyyaml", "rich"):
        assert version(name) == pins[name], name  # `make setup` installed these pins


def test_import_is_light_and_exposes_the_api():
    code = ("import sys, dmoe; assert 'torch' not in sys.modules, 'import dmoe pulled torch'; "
            "print(dmoe.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == PYPROJECT["project"]["version"] == dmoe.__version__
    from dmoe.moe.layer import MoELayer
    from dmoe.parallel.expert_parallel.apply import shard_moe_layers

    assert dmoe.MoELayer is MoELayer and dmoe.shard_moe_layers is shard_moe_layers
    assert callable(dmoe.parallelize) and callable(dmoe.load_config) and dmoe.Config().moe.top_k == 2


def test_dmoe_version_flag():
    out = subprocess.run([sys.executable, "-m", "dmoe.cli", "--version"], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert out == f"dmoe {PYPROJECT['project']['version']}\n"
