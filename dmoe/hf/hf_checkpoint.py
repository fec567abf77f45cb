"""Read a Hugging Face checkpoint directory tensor by tensor (safetensors only, no pickle).

    ckpt = HFCheckpoint("path/to/Mixtral")   # config.json + model.safetensors, or an index
    ckpt.config["model_type"], ckpt.shape(name), ckpt.get(name)

Only headers are read up front (names, shapes, dtypes); each `get` reads one tensor from
its shard (safetensors safe_open, memory-mapped), so a conversion holds at most what it is
assembling. Errors are one line naming the directory, file or tensor.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import HFError
from .safetensors_stream import CODE_DTYPES

CONFIG, SINGLE, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise HFError(f"{path}: unreadable JSON ({err})".splitlines()[0]) from None
    if not isinstance(value, dict):
        raise HFError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_config(directory: str | Path) -> dict:
    """config.json of an HF checkpoint directory (first: it says what the weights are)."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise HFError(f"{directory}: not a Hugging Face checkpoint (no {CONFIG})")
    return _read_json(path)


class HFCheckpoint:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.config = read_config(self.dir)
        self.files = self._weight_files()
        self._open: dict[str, object] = {}
        self.where: dict[str, str] = {}  # tensor name -> file
        for file, claimed in self.files.items():
            handle = self._handle(file)
            names = set(handle.keys())
            for name in sorted(claimed - names) if claimed else ():
                raise HFError(f"{self.dir / file}: has no tensor {name} ({INDEX} puts it there)")
            for name in names:
                self.where.setdefault(name, file)

    def _weight_files(self) -> dict[str, set[str]]:
        """file -> tensor names the index places there (empty set: a single file)."""
        if (self.dir / INDEX).is_file():
            weight_map = _read_json(self.dir / INDEX).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HFError(f"{self.dir / INDEX}: no weight_map")
            files: dict[str, set[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(file, set()).add(name)
            for file in files:
                if not (self.dir / file).is_file():
                    raise HFError(f"{self.dir / file}: missing (named by {INDEX})")
            return files
        if (self.dir / SINGLE).is_file():
            return {SINGLE: set()}
        found = sorted(p.name for pattern in ("*.bin", "*.pt*") for p in self.dir.glob(pattern))
        if found:
            raise HFError(f"{self.dir}: weights only as {found[0]} (pickle); dmoe reads "
                          "safetensors only: convert with transformers' save_pretrained")
        raise HFError(f"{self.dir}: no {SINGLE} or {INDEX}")

    def _handle(self, file: str):
        if file not in self._open:
            try:
                self._open[file] = safe_open(str(self.dir / file), framework="pt")
            except Exception as err:  # noqa: BLE001 - safetensors raises its own types
                line = f"{self.dir / file}: not a safetensors file ({err})".splitlines()[0]
                raise HFError(line) from None
        return self._open[file]

    def names(self) -> set[str]:
        return set(self.where)

    def _slice(self, name: str):
        if name not in self.where:
            raise HFError(f"{self.dir}: missing tensor {name}")
        return self._handle(self.where[name]).get_slice(name)

    def shape(self, name: str) -> list[int]:
        return list(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._slice(name).get_dtype()
        if code not in CODE_DTYPES:
            raise HFError(f"{self.dir / self.where[name]}: {name} has dtype {code}; "
                          f"dmoe reads {sorted(CODE_DTYPES)}")
        return CODE_DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise HFError(f"{self.dir}: missing tensor {name}")
        return self._handle(self.where[name]).get_tensor(name)
