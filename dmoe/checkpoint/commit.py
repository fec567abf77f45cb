"""The checkpoint tree of a run and the one commit sequence that adds to it.

    run_dir/checkpoints/
        latest                    name of the newest complete checkpoint ("step_000100")
        step_000100/              one complete checkpoint (format: dmoe.checkpoint.format)
            manifest.json  config.yaml  rank_00000.safetensors  rank_00001.safetensors ...
        .tmp-step_000200/         a save in progress (or killed): never read, removed by
                                  the next save

Commit (`commit`, used by the training save and by the offline reshard alike): the rank
files are already fsynced in the temp dir; write manifest.json and config.yaml durably,
fsync the temp dir, rename it to its final name, fsync the parent, then (training saves)
move `latest` atomically and prune beyond train.keep_last. A kill at any point before the
rename leaves the previous checkpoint and `latest` as they were. No communication.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from .durable import fsync_dir, write_atomic, write_durable
from .errors import CheckpointError
from .format import MANIFEST

log = logging.getLogger(__name__)

CKPT_DIR, LATEST = "checkpoints", "latest"
STEP_DIR = re.compile(r"^step_(\d+)$")


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def temp_dir_for(final: Path) -> Path:
    return final.with_name(f".tmp-{final.name}")


def commit(tmp: Path, final: Path, manifest: dict, config_yaml: str, move_latest: bool = True,
           keep_last: int = 0) -> Path:
    """Make the filled temp dir `tmp` the checkpoint `final` (see the module doc)."""
    write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    write_durable(tmp / "config.yaml", config_yaml.encode())
    fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. after a resume)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if move_latest:
        write_atomic(final.parent / LATEST, final.name.encode())
        prune(final.parent, keep_last)
    return final


def remove_stale(root: Path) -> None:
    for stale in root.glob(".tmp-step_*"):
        log.warning("removing incomplete checkpoint %s (a save that did not finish)", stale)
        shutil.rmtree(stale, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """Committed step directories, oldest first."""
    found = [(int(m.group(1)), p) for p in root.glob("step_*")
             if (m := STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep 0: keep all)."""
    done = complete_checkpoints(root)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
        log.info("pruned checkpoint %s (train.keep_last=%d)", old, keep)


def latest_checkpoint(root: Path) -> Path | None:
    """What `latest` names, else the newest complete step directory, else None."""
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if not (target / MANIFEST).is_file():
            raise CheckpointError(f"{pointer}: names {target.name}, which has no {MANIFEST}")
        return target
    done = complete_checkpoints(root)
    return done[-1] if done else None


def resolve_checkpoint(where: str, run_dir: str = ".") -> Path | None:
    """train.resume or a tool's SRC: "" (none), "auto" (latest in run_dir, if any), a
    checkpoint directory, a run's checkpoints/ directory or a run directory (its latest)."""
    if not where:
        return None
    if where == "auto":
        return latest_checkpoint(Path(run_dir) / CKPT_DIR)
    path = Path(where)
    if (path / MANIFEST).is_file():
        return path
    for root in (path, path / CKPT_DIR):
        if root.is_dir() and (found := latest_checkpoint(root)):
            return found
    raise CheckpointError(f"train.resume ({where}): no checkpoint (no {MANIFEST}) there")
