"""The checkpoint tree of a run and the one commit sequence that adds to it.

    run_dir/checkpoints/
        latest                    name of the newest complete checkpoint ("step_000100")
        step_000100/              one complete checkpoint (format: dmoe.checkpoint.format)
            manifest.json  config.yaml  rank_00000.safetensors  rank_00001.safetensors ...
        .tmp-step_000200/         a save in progress (or killed): never read, removed by
                                  the next save
        .prev-step_000100/        the committed step_000100 while the same step is saved
                                  again: put back if the new one never arrived, else removed

Commit (`commit`, used by the training save and by the offline reshard alike): the rank
files are already fsynced in the temp dir; write manifest.json (with `seq`, one more than
any checkpoint beside it: the commit order) and config.yaml durably, fsync the temp dir;
if the step exists already, rename it aside (.prev-); rename the temp dir to its final
name, fsync the parent, then (training saves) move `latest` atomically, delete the aside
and prune beyond train.keep_last. A kill at any point leaves `latest` naming a loadable
checkpoint (before the new rename: the previous one; between the aside and the new rename:
`latest_checkpoint` falls back to the aside). No communication.

Pruning keeps the newest commits (by `seq`, not by step number: a run resumed from an
earlier step, or a new run, saves lower steps than the ones beside it) and never deletes
the checkpoint just committed nor the one `latest` names.
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
ASIDE = ".prev-"


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def temp_dir_for(final: Path) -> Path:
    return final.with_name(f".tmp-{final.name}")


def aside_dir_for(final: Path) -> Path:
    return final.with_name(f"{ASIDE}{final.name}")


def _rename(src: Path, dst: Path) -> None:
    """One atomic rename (a function of its own so that tests can stop a commit here)."""
    os.replace(src, dst)


def commit(tmp: Path, final: Path, manifest: dict, config_yaml: str, move_latest: bool = True,
           keep_last: int = 0) -> Path:
    """Make the filled temp dir `tmp` the checkpoint `final` (see the module doc)."""
    root = final.parent
    manifest = {**manifest, "seq": next_seq(root)}
    write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    write_durable(tmp / "config.yaml", config_yaml.encode())
    fsync_dir(tmp)
    aside = aside_dir_for(final)
    if final.exists():  # the same step saved again (e.g. after a resume): keep it until replaced
        shutil.rmtree(aside, ignore_errors=True)
        _rename(final, aside)
        fsync_dir(root)
    _rename(tmp, final)
    fsync_dir(root)
    if move_latest:
        write_atomic(root / LATEST, final.name.encode())
    shutil.rmtree(aside, ignore_errors=True)
    if move_latest:
        prune(root, keep_last, keep={final.name})
    return final


def _seq(path: Path) -> int:
    """The commit sequence number in a checkpoint's manifest (0: saved before dmoe kept one)."""
    try:
        seq = json.loads((path / MANIFEST).read_text()).get("seq", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return seq if isinstance(seq, int) else 0


def next_seq(root: Path) -> int:
    found = complete_checkpoints(root) + [p for p in root.glob(f"{ASIDE}step_*") if (p / MANIFEST).is_file()]
    return 1 + max((_seq(p) for p in found), default=0)


def remove_stale(root: Path) -> None:
    """Before a save: delete killed saves' temp dirs; put back a re-saved step whose
    replacement never arrived, else delete the leftover aside."""
    for stale in root.glob(".tmp-step_*"):
        log.warning("removing incomplete checkpoint %s (a save that did not finish)", stale)
        shutil.rmtree(stale, ignore_errors=True)
    for aside in root.glob(f"{ASIDE}step_*"):
        final = root / aside.name.removeprefix(ASIDE)
        if not final.exists() and (aside / MANIFEST).is_file():
            log.warning("restoring %s from %s (a re-save that did not finish)", final, aside)
            _rename(aside, final)
        else:
            shutil.rmtree(aside, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """Committed step directories, oldest commit first (by manifest `seq`, then step)."""
    found = [(_seq(p), int(m.group(1)), p) for p in root.glob("step_*")
             if (m := STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for *_, p in sorted(found)]


def _latest_name(root: Path) -> str | None:
    pointer = root / LATEST
    try:
        return pointer.read_text().strip() if pointer.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def prune(root: Path, keep_last: int, keep: set[str] = frozenset()) -> None:
    """Delete all but the newest `keep_last` commits (0: keep all); never those named in
    `keep` (the checkpoint just committed) nor the one `latest` names."""
    if keep_last <= 0:
        return
    protected = set(keep) | {_latest_name(root)}
    for old in complete_checkpoints(root)[:-keep_last]:
        if old.name in protected:
            continue
        shutil.rmtree(old, ignore_errors=True)
        log.info("pruned checkpoint %s (train.keep_last=%d)", old, keep_last)


def read_latest(root: Path) -> str:
    """The name in `latest`: one line naming a directory beside it, or a CheckpointError."""
    pointer = root / LATEST
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{pointer}: not a text file (expected a name like step_000100)") from None
    except OSError as err:
        raise CheckpointError(f"{pointer}: unreadable ({err.strerror})") from None
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\n" in name:
        raise CheckpointError(f"{pointer}: names {name[:80]!r}, expected a checkpoint directory "
                              "beside it (like step_000100)")
    return name


def latest_checkpoint(root: Path) -> Path | None:
    """What `latest` names, else the newest complete step directory, else None."""
    pointer = root / LATEST
    if pointer.is_file():
        target = root / read_latest(root)
        if (target / MANIFEST).is_file():
            return target
        aside = aside_dir_for(target)
        if (aside / MANIFEST).is_file():  # killed while saving this step again
            log.warning("%s: %s is being replaced; using %s", pointer, target.name, aside)
            return aside
        raise CheckpointError(f"{pointer}: names {target.name}, which has no {MANIFEST}")
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
