"""Save a training run's checkpoint: every rank its slices, rank 0 commits.

Each rank writes only the slices it is the writer of (dmoe.checkpoint.slices: its expert
shard, its TP shard; replicated tensors by rank 0), each with the AdamW state of that
slice, plus its RNG states. Saving, in order (communication: a barrier, a gather, a broadcast):
    1. rank 0 removes stale temp dirs and creates .tmp-step_N; barrier
    2. every rank writes and fsyncs its file into the temp dir
    3. gather of every rank's record (file, sha256, slices) to rank 0 (all ranks done)
    4. rank 0 commits (dmoe.checkpoint.commit: manifest + config, fsync, rename,
       `latest`, prune beyond train.keep_last)
    5. broadcast of the outcome: nobody trains on before the checkpoint is committed
A write that fails (disk full, quota, I/O error) on any rank is carried through 3 and 5
instead of raised at once, so every rank stops alike: rank 0 deletes the temp dir and every
rank raises a CheckpointError naming the file; the previous checkpoint and `latest` are
untouched.
"""
from __future__ import annotations

import errno
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import yaml

from dmoe.config import Config
from dmoe.parallel.layout import ParallelLayout, ProcessGroups

from .commit import CKPT_DIR, commit, latest_checkpoint, remove_stale, step_name, temp_dir_for
from .errors import CheckpointError
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
    record = {"file": rank_file(rank), "rank": rank, "tensors": records}
    try:
        record.update(write_tensors(tmp / rank_file(rank), tensors))
    except OSError as err:
        record["error"] = _write_error(tmp / rank_file(rank), err)
    gathered = [None] * groups.layout.world_size if rank == 0 else None
    dist.gather_object(record, gathered, dst=0)
    outcome = [None]
    if rank == 0:
        outcome[0] = next((r["error"] for r in gathered if "error" in r), None)
        if outcome[0] is None:
            head = {"step": step, "layout": layout_dict(groups.layout), "engine": engine.name,
                    "data": data_state or {"step": step},
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            try:
                commit(tmp, final, merge_records(gathered, head),
                       yaml.safe_dump(cfg.to_dict(), sort_keys=False),
                       keep_last=cfg.train.keep_last)
            except OSError as err:
                outcome[0] = _write_error(Path(err.filename) if err.filename else tmp, err)
        if outcome[0] is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; `latest` never moved
            outcome[0] = f"saving step {step} failed: {outcome[0]}; {_kept(root)}"
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise CheckpointError(outcome[0])
    log.info("checkpoint %s saved", final)
    return final


def _write_error(path: Path, err: OSError) -> str:
    code = errno.errorcode.get(err.errno, err.errno) if err.errno else type(err).__name__
    return f"{path}: {err.strerror or err} ({code})"


def _kept(root: Path) -> str:
    try:
        latest = latest_checkpoint(root)
    except CheckpointError:
        latest = None
    return f"{latest} kept as the latest checkpoint" if latest else "no earlier checkpoint"
