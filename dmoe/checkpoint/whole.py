"""A run directory from whole tensors: what `dmoe upcycle` and `dmoe merge` write.

    write_run_dir("runs/btx", cfg, tensors, {"merged_from": [...]})

RUN_DIR afterwards, as `dmoe import` leaves it (dmoe.hf.importer):
    config.yaml                       the resolved config (train.run_dir = RUN_DIR,
                                      train.resume = auto: the first start loads step 0)
    checkpoints/latest, step_000000/  a 1-rank checkpoint, `param/<name>` tensors only
                                      (fp32): any layout loads it, resharding on load;
                                      AdamW starts fresh
Committed by the one commit sequence (dmoe.checkpoint.commit) inside a sibling temp dir
renamed at the end: a failure leaves nothing. Holds the whole model in memory; no
communication.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
import yaml

from dmoe.config import Config
from dmoe.parallel.layout import ParallelLayout

from .commit import CKPT_DIR, commit, step_name, temp_dir_for
from .errors import CheckpointError
from .format import merge_records, rank_file, write_tensors
from .save import layout_dict
from .slices import global_plan


def check_against_plan(cfg: Config, tensors: dict[str, torch.Tensor]) -> None:
    """Exactly the parameters of cfg's model, each with its global shape."""
    plan = global_plan(cfg)
    odd = sorted(set(plan) ^ set(tensors))
    if odd:
        where = "the model lacks" if odd[0] in tensors else "missing"
        raise CheckpointError(f"tensor {odd[0]}: {where} ({len(odd)} names differ)")
    for name, (shape, _) in plan.items():
        if list(tensors[name].shape) != shape:
            raise CheckpointError(f"tensor {name}: shape {list(tensors[name].shape)}, the model "
                                  f"{shape}")


def write_run_dir(run_dir: str | Path, cfg: Config, tensors: dict[str, torch.Tensor],
                  head: dict | None = None) -> Path:
    run = Path(run_dir)
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise CheckpointError(f"{run}: already exists and is not empty; choose a new directory")
    cfg.train.run_dir, cfg.train.resume = str(run), "auto"
    check_against_plan(cfg, tensors)
    tmp_run = run.with_name(f".tmp-{run.name}")
    shutil.rmtree(tmp_run, ignore_errors=True)
    try:
        final = tmp_run / CKPT_DIR / step_name(0)
        tmp = temp_dir_for(final)
        tmp.mkdir(parents=True)
        tensors = {n: t.detach().to(torch.float32).contiguous() for n, t in tensors.items()}
        info = write_tensors(tmp / rank_file(0), {f"param/{n}": t for n, t in tensors.items()})
        records = [{"file": rank_file(0), "rank": 0, **info, "tensors": [
            {"name": n, "shape": list(t.shape), "dtype": "float32", "states": ["param"],
             "rule": None, "runs": None} for n, t in tensors.items()]}]
        manifest_head = {"step": 0, "layout": layout_dict(ParallelLayout(1)), "engine": "offline",
                         "data": {"step": 0}, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         **(head or {})}
        config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        commit(tmp, final, merge_records(records, manifest_head), config_yaml)
        (tmp_run / "config.yaml").write_text(config_yaml)
        os.replace(tmp_run, run)
    except BaseException:
        shutil.rmtree(tmp_run, ignore_errors=True)
        raise
    return run
