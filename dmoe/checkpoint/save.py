"""Save a training run's checkpoint: every rank its slices, rank 0 commits.

Each rank writes only the slices it is the writer of (dmoe.checkpoint.slices: its expert
shard, its TP shard; replicated tensors by rank 0), each with the AdamW state of that
slice, plus its RNG states. Saving, in order (communication: two barriers, one gather):
    1. rank 0 removes stale temp dirs and creates .tmp-step_N; barrier
    2. every rank writes and fsyncs its file into the temp dir
    3. gather of every rank's record (file, sha256, slices) to rank 0 (all ranks done)
    4. rank 0 commits (dmoe.checkpoint.commit: manifest + config, fsync, rename,
       `latest`, prune beyond train.keep_last)
    5. barrier: nobody trains on before the checkpoint is committed
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import yaml

from dmoe.config import Config
from dmoe.parallel.layout import ParallelLayout, ProcessGroups

from .commit import CKPT_DIR, commit, remove_stale, step_name, temp_dir_for
from .format import merge_records, rank_file, write_tensors
from .slices import is_writer, param_slices

if TYPE_CHECKING:
    from dmoe.train.engines import Engine

log = logging.getLogger(__name__)


def layout_dict(layout: ParallelLayout) -> dict:
    return {"world_size": layout.world_size, "tp": layout.tp, "ep": layout.ep, "dp": layout.dp}


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng/cuda"] = torch.cuda.get_rng_state()
    return out


def local_shard(engine: Engine, groups: ProcessGroups) -> tuple[dict, list[dict]]:
    """The tensors this rank writes ("<state>/<name>") and their manifest records.

    `engine.param_states` runs for every param on every rank, writer or not: under DeepSpeed
    ZeRO 1/2 it is a collective over the param's ZeRO group (dmoe.checkpoint.optimizer_state)."""
    tensors, records = _rng_tensors(), []
    for piece in param_slices(engine.module, groups.layout, groups.rank):
        states = engine.param_states(piece.param)
        if not is_writer(piece.rule, groups.layout, groups.rank):
            continue
        tensors.update({f"{s}/{piece.name}": v for s, v in states.items()})
        records.append({
            "name": piece.name, "shape": piece.global_shape, "runs": piece.runs,
            "dtype": str(states["param"].dtype).removeprefix("torch."), "states": list(states),
            "rule": piece.rule.to_json() if piece.rule else None,
        })
    return tensors, records


def save_checkpoint(engine: Engine, cfg: Config, groups: ProcessGroups, step: int,
                    data_state: dict | None = None) -> Path:
    """Collective: every rank calls it at the same step. Returns the committed directory."""
    root = Path(cfg.train.run_dir) / CKPT_DIR
    final, rank = root / step_name(step), groups.rank
    tmp = temp_dir_for(final)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)
        tmp.mkdir()
    dist.barrier()
    tensors, records = local_shard(engine, groups)
    record = {"file": rank_file(rank), "rank": rank, "tensors": records,
              **write_tensors(tmp / rank_file(rank), tensors)}
    gathered = [None] * groups.layout.world_size if rank == 0 else None
    dist.gather_object(record, gathered, dst=0)
    if rank == 0:
        head = {"step": step, "layout": layout_dict(groups.layout), "engine": engine.name,
                "data": data_state or {"step": step}, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        commit(tmp, final, merge_records(gathered, head),
               yaml.safe_dump(cfg.to_dict(), sort_keys=False), keep_last=cfg.train.keep_last)
    dist.barrier()
    log.info("checkpoint %s saved", final)
    return final
