"""Resume a run from a checkpoint, in this layout or another (resharding on load).

Loading reads each parameter's slice for this rank's layout: the matching piece when the
layout is the saving one, else the global tensor assembled from the manifest's pieces and
cut again (TP, EP and DP degrees may all change). Communication: one broadcast (rank 0's
verdict on every file's checksum) so that all ranks fail together.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from dmoe.config import Config
from dmoe.parallel.layout import ProcessGroups

from .commit import resolve_checkpoint
from .errors import CheckpointError
from .format import MANIFEST, CheckpointReader, rank_file
from .save import layout_dict
from .slices import param_slices

if TYPE_CHECKING:
    from dmoe.train.engines import Engine

log = logging.getLogger(__name__)


def maybe_resume(cfg: Config, engine: Engine, groups: ProcessGroups) -> int:
    """Load train.resume if set; returns the step to continue after (0: fresh start)."""
    path = resolve_checkpoint(cfg.train.resume, cfg.train.run_dir)
    if path is None:
        if cfg.train.resume:
            log.info("train.resume=auto: no checkpoint in %s yet, starting fresh", cfg.train.run_dir)
        return 0
    return load_checkpoint(engine, groups, path)["step"]


def _verify_together(reader: CheckpointReader, groups: ProcessGroups) -> None:
    """Rank 0 checks every file; all ranks raise the same one-line error if one is bad."""
    verdict = [None]
    if groups.rank == 0:
        try:
            reader.verify_all()
        except CheckpointError as err:
            verdict[0] = str(err)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise CheckpointError(verdict[0])


@torch.no_grad()
def load_checkpoint(engine: Engine, groups: ProcessGroups, path: Path | str,
                    optimizer: bool = True) -> dict:
    """Collective (one broadcast). Fills the model, AdamW state and RNG; returns the manifest.

    Works across engines (a DeepSpeed save resumes under torch and back): both save whole
    fp32 tensors per slice; `engine.load_param_states` puts them where the engine keeps them."""
    reader = CheckpointReader(Path(path))
    _verify_together(reader, groups)
    specs = param_slices(engine.module, groups.layout, groups.rank)
    unknown = set(reader.tensors) - {s.name for s in specs}
    if unknown:
        raise CheckpointError(f"{reader.dir / MANIFEST}: tensors the model lacks: {sorted(unknown)[:4]}")
    for spec in specs:
        entry = reader.entry(spec.name)
        if entry["shape"] != spec.global_shape:
            raise CheckpointError(f"{reader.dir / MANIFEST}: {spec.name} has shape {entry['shape']}, "
                                  f"the model {spec.global_shape}")
        wanted = entry["states"] if optimizer else ["param"]
        engine.load_param_states(spec.param, {s: reader.read(spec.name, s, spec.rule, spec.runs)
                                              for s in wanted})
    same_layout = reader.manifest["layout"] == layout_dict(groups.layout)
    if same_layout:
        _restore_rng(reader, groups.rank)
    engine.resume_at(reader.manifest["step"])
    log.info("resumed from %s (step %d, saved under %s by engine %s%s)", reader.dir,
             reader.manifest["step"], reader.manifest["layout"], reader.manifest.get("engine"),
             "" if same_layout else ", resharded; RNG states not restored")
    return reader.manifest


def _restore_rng(reader: CheckpointReader, rank: int) -> None:
    """This rank's RNG states, where the checkpoint has them (offline reshards do not)."""
    keys = set(reader.keys(rank_file(rank)))
    if "rng/torch" in keys:
        torch.set_rng_state(reader.get(rank_file(rank), "rng/torch"))
    if torch.cuda.is_available() and "rng/cuda" in keys:
        torch.cuda.set_rng_state(reader.get(rank_file(rank), "rng/cuda"))
