"""Offline checkpoint conversions: single process, no process groups.

    reshard(SRC, OUT, world_size=8, tp=2, ep=4)   OUT: a checkpoint for that layout
    export(SRC, "model.safetensors")               every parameter whole, unsharded names

SRC is a checkpoint directory (with manifest.json), a run's checkpoints/ directory or a
run directory (its latest). Resharding needs no tool (a run resumed under another layout
reshards on load); this writes the target layout's files ahead of time, cut by the same
sharding plan (dmoe.checkpoint.slices.global_plan) and committed by the same sequence
(dmoe.checkpoint.commit) as a training save. Holds the whole model in memory.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dmoe.config import load_config
from dmoe.parallel.layout import ParallelLayout

from .commit import commit, resolve_checkpoint, temp_dir_for
from .errors import CheckpointError
from .format import MANIFEST, CheckpointReader, merge_records, rank_file, write_tensors
from .save import layout_dict
from .slices import cut, effective_rule, global_plan, is_writer, rule_runs

log = logging.getLogger(__name__)


def open_checkpoint(src: str) -> CheckpointReader:
    """A verified reader of SRC (see the module doc for what SRC may be)."""
    path = Path(src) if (Path(src) / MANIFEST).is_file() else resolve_checkpoint(src)
    reader = CheckpointReader(path)
    reader.verify_all()
    return reader


def reshard(src: str, out: str, world_size: int, tp: int = 1, ep: int = 1) -> Path:
    """Write SRC's model and AdamW state cut for layout (world_size, tp, ep) into OUT."""
    reader, out_dir = open_checkpoint(src), Path(out)
    if out_dir.exists():
        raise CheckpointError(f"{out_dir}: already exists; choose a new output directory")
    cfg = load_config(reader.dir / "config.yaml", [f"--parallel.tp={tp}", f"--parallel.ep={ep}"])
    layout = ParallelLayout(world_size, tp=tp, ep=ep)
    layout.validate(cfg.moe.num_experts)
    plan = global_plan(cfg)
    shards: dict[int, tuple[dict, list]] = {r: ({}, []) for r in range(world_size)}
    for name, entry in reader.tensors.items():
        rule = effective_rule(plan[name][1] if name in plan else None, layout)
        writers = [r for r in range(world_size) if is_writer(rule, layout, r)]
        full = {s: reader.global_tensor(name, s) for s in entry["states"]}
        for r in writers:
            runs = rule_runs(rule, entry["shape"][rule.dim], layout, r) if rule else None
            for state, value in full.items():
                shards[r][0][f"{state}/{name}"] = value if state == "step" else cut(value, rule, runs)
            shards[r][1].append({**{k: entry[k] for k in ("shape", "dtype", "states")}, "name": name,
                                 "rule": rule.to_json() if rule else None, "runs": runs})
    tmp = temp_dir_for(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    records = [{"file": rank_file(r), "rank": r, "tensors": recs,
                **write_tensors(tmp / rank_file(r), t)} for r, (t, recs) in shards.items()]
    head = {k: reader.manifest[k] for k in ("step", "engine", "data")}
    head.update(layout=layout_dict(layout), resharded_from=str(reader.dir))
    commit(tmp, out_dir, merge_records(records, head), (reader.dir / "config.yaml").read_text(),
           move_latest=False)
    log.info("resharded %s (%s) -> %s (%s)", reader.dir, reader.manifest["layout"], out_dir,
             layout_dict(layout))
    return out_dir


def export(src: str, out: str, dtype: str | None = None) -> Path:
    """One safetensors file of whole parameters (no optimizer state, no pickle)."""
    reader = open_checkpoint(src)
    tensors = {name: reader.global_tensor(name, "param") for name in reader.tensors}
    if dtype:
        tensors = {k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}
    meta = {"format": "dmoe-export/1", "step": str(reader.manifest["step"]),
            "config_yaml": (reader.dir / "config.yaml").read_text()}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    log.info("exported %d tensors of %s (step %s) to %s", len(tensors), reader.dir, meta["step"], path)
    return path
