"""The checkpoint format: rank files, the manifest, verified reads, global assembly.

One checkpoint directory (the tree around it: dmoe.checkpoint.commit):
    manifest.json            format, step, layout, data position, files (sha256, bytes,
                             rank), tensors (global shape, dtype, shard rule, the states
                             saved, and per piece: file + runs of the slice it holds)
    config.yaml              the resolved config of the run that saved it
    rank_00000.safetensors   one per rank: the slices it writes (keys "<state>/<name>",
                             state in param | exp_avg | exp_avg_sq | step) and its RNG
                             states ("rng/<kind>")
Tensors are safetensors only (no pickle is ever loaded); every file is checked against
its sha256 before its first read. No communication here.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from dmoe.parallel.plan import ShardRule

from .durable import write_durable
from .errors import CheckpointError
from .slices import cut, index_of

FORMAT = "dmoe-checkpoint/1"
MANIFEST = "manifest.json"
REQUIRED = {"step": int, "layout": dict, "files": dict, "tensors": dict}  # manifest keys read


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """One safetensors file, fsynced; returns its sha256 and size for the manifest."""
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    write_durable(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def merge_records(records: list[dict], head: dict) -> dict:
    """Manifest from every rank's record {file, sha256, bytes, rank, tensors: [...]}."""
    manifest = {"format": FORMAT, **head, "files": {}, "tensors": {}}
    for rec in records:
        manifest["files"][rec["file"]] = {k: rec[k] for k in ("sha256", "bytes", "rank")}
        for t in rec["tensors"]:
            entry = manifest["tensors"].setdefault(t["name"], {
                "shape": t["shape"], "dtype": t["dtype"], "rule": t["rule"],
                "states": t["states"], "pieces": [],
            })
            entry["pieces"].append({"file": rec["file"], "runs": t["runs"]})
    return manifest


# ---------------------------------------------------------------- reads
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class CheckpointReader:
    """Reads slices of global tensors from one checkpoint directory, whatever its layout."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}: missing or unreadable manifest ({err})".splitlines()[0]) from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            found = self.manifest.get("format") if isinstance(self.manifest, dict) else self.manifest
            raise CheckpointError(f"{path}: format {found!r:.60}, expected {FORMAT!r}")
        missing = [k for k in REQUIRED if not isinstance(self.manifest.get(k), REQUIRED[k])]
        if missing:
            raise CheckpointError(f"{path}: no valid {missing[0]!r} entry (a manifest names "
                                  f"{', '.join(REQUIRED)})")
        self._open: dict[str, object] = {}

    @property
    def tensors(self) -> dict:
        return self.manifest["tensors"]

    def verify_all(self) -> None:
        for name in self.manifest["files"]:
            self._file(name)

    def _file(self, name: str):
        """safe_open handle of a file, its existence, size and sha256 checked first."""
        if name in self._open:
            return self._open[name]
        info, path = self.manifest["files"].get(name), self.dir / name
        if info is None:
            raise CheckpointError(f"{self.dir / MANIFEST}: names piece file {name} but not its checksum")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, manifest says {info['bytes']} (truncated?)")
        digest = _sha256(path)
        if digest != info["sha256"]:
            raise CheckpointError(f"{path}: sha256 {digest[:12]}... does not match manifest "
                                  f"{info['sha256'][:12]}...")
        try:
            self._open[name] = safe_open(str(path), framework="pt")
        except Exception as err:  # noqa: BLE001 - safetensors raises its own types
            raise CheckpointError(f"{path}: not a safetensors file ({err})".splitlines()[0]) from None
        return self._open[name]

    def keys(self, file: str) -> list[str]:
        return list(self._file(file).keys()) if file in self.manifest["files"] else []

    def get(self, file: str, key: str) -> torch.Tensor:
        handle = self._file(file)
        if key not in handle.keys():
            raise CheckpointError(f"{self.dir / file}: has no tensor {key!r}")
        return handle.get_tensor(key)

    def entry(self, name: str) -> dict:
        if name not in self.tensors:
            raise CheckpointError(f"{self.dir / MANIFEST}: has no tensor {name!r}")
        return self.tensors[name]

    def global_tensor(self, name: str, state: str = "param") -> torch.Tensor:
        """The whole tensor, assembled from its pieces (one read per piece)."""
        entry = self.entry(name)
        rule, key = ShardRule.from_json(entry["rule"]), f"{state}/{name}"
        if rule is None or state == "step":
            return self.get(entry["pieces"][0]["file"], key)
        shape, full = list(entry["shape"]), entry["shape"][rule.dim]
        out, covered = None, torch.zeros(full, dtype=torch.bool)
        for piece in entry["pieces"]:
            part, index = self.get(piece["file"], key), index_of(piece["runs"])
            if out is None:
                out = part.new_empty(shape)
            out.index_copy_(rule.dim, index, part)
            covered[index] = True
        if out is None or not bool(covered.all()):
            raise CheckpointError(f"{self.dir / MANIFEST}: pieces of {name!r} cover "
                                  f"{int(covered.sum())} of {full} along dim {rule.dim}")
        return out

    def read(self, name: str, state: str, rule: ShardRule | None,
             runs: list[list[int]] | None) -> torch.Tensor:
        """This rank's slice (the reader's rule and runs) of one state of a tensor."""
        entry, key = self.entry(name), f"{state}/{name}"
        for piece in entry["pieces"]:
            if piece["runs"] == runs or state == "step":  # same cut as saved: read it as is
                return self.get(piece["file"], key)
        return cut(self.global_tensor(name, state), rule, runs)
