"""The `hf` extra: one transformers pin in pyproject.toml and the Makefile (what `make
setup` installs), the one installed here, and a torch that is still the venv's own."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_transformers_pin_is_one_version():
    transformers = pytest.importorskip("transformers")
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["hf"]
    pinned = {re.sub(r"\s", "", spec) for spec in extra if spec.startswith("transformers")}
    make = re.search(r"^TRANSFORMERS := (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)
    assert pinned == {make} == {f"transformers=={transformers.__version__}"}


def test_transformers_needs_no_torch_of_its_own():
    from importlib.metadata import requires

    pytest.importorskip("transformers")
    hard = [r for r in requires("transformers") or [] if "extra ==" not in r]
    assert not any(re.match(r"torch\b", r) for r in hard), hard
