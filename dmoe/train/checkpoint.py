"""Sharded, atomic, reshardable checkpoints of a training run.

    run_dir/checkpoints/
        latest                    name of the newest complete checkpoint ("step_000100")
        step_000100/              one complete checkpoint (format: dmoe.train.ckpt_io)
            manifest.json  config.yaml  rank_00000.safetensors  rank_00001.safetensors ...
        .tmp-step_000200/         a save in progress (or killed): never read, removed by
                                  the next save

Each rank writes only the slices it is the writer of (dmoe.train.shard_spec: its expert
shard, its TP shard; replicated tensors by rank 0), each with the AdamW state of that
slice, plus its RNG states. Saving, in order (communication: two barriers, one gather):
    1. rank 0 removes stale temp dirs and creates .tmp-step_N; barrier
    2. every rank writes and fsyncs its file into the temp dir
    3. gather of every rank's record (file, sha256, slices) to rank 0 (all ranks done)
    4. rank 0 writes manifest.json + config.yaml, fsyncs, renames the temp dir to step_N,
       fsyncs checkpoints/, replaces `latest` atomically, prunes beyond train.keep_last
    5. barrier: nobody trains on before the checkpoint is committed
A kill at any point before 4's rename leaves the previous checkpoint and `latest` as they were.

Loading reads each parameter's slice for this rank's layout: the matching piece when the
layout is the saving one, else the global tensor assembled from the manifest's pieces and
cut again (resharding: TP, EP and DP degrees may all change). Communication: one broadcast
(rank 0's verdict on every file's checksum) so that all ranks fail together.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from dmoe.config import Config
from dmoe.parallel.layout import ParallelLayout

from .ckpt_io import (MANIFEST, CheckpointReader, fsync_dir, merge_records, rank_file,
                      write_atomic, write_durable, write_tensors)
from .shard_spec import CheckpointError, is_writer, param_specs

log = logging.getLogger(__name__)

CKPT_DIR, LATEST = "checkpoints", "latest"
STEP_DIR = re.compile(r"^step_(\d+)$")
PAUSE_ENV = "DMOE_CKPT_TEST_PAUSE_S"  # tests only: sleep inside the temp-dir phase


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def layout_dict(layout: ParallelLayout) -> dict:
    return {"world_size": layout.world_size, "tp": layout.tp, "ep": layout.ep, "dp": layout.dp}


# ---------------------------------------------------------------- save
def _rng_tensors() -> dict:
    out = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng/cuda"] = torch.cuda.get_rng_state()
    return out


def local_shard(engine, groups) -> tuple[dict, list[dict]]:
    """The tensors this rank writes ("<state>/<name>") and their manifest records.

    `engine.param_states` runs for every param on every rank, writer or not: under DeepSpeed
    ZeRO 1/2 it is a collective over the param's ZeRO group (dmoe.train.optim_state)."""
    tensors, records = _rng_tensors(), []
    for spec in param_specs(engine.module, groups):
        states = engine.param_states(spec.param)
        if not is_writer(spec.rule, groups.layout, groups.rank):
            continue
        tensors.update({f"{s}/{spec.name}": v for s, v in states.items()})
        records.append({
            "name": spec.name, "shape": spec.global_shape, "runs": spec.runs,
            "dtype": str(states["param"].dtype).removeprefix("torch."), "states": list(states),
            "rule": spec.rule.to_json() if spec.rule else None,
        })
    return tensors, records


def save_checkpoint(engine, cfg: Config, groups, step: int, data_state: dict | None = None) -> Path:
    """Collective: every rank calls it at the same step. Returns the committed directory."""
    root = Path(cfg.train.run_dir) / CKPT_DIR
    name, rank = step_name(step), groups.rank
    tmp = root / f".tmp-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        tmp.mkdir()
    dist.barrier()
    tensors, records = local_shard(engine, groups)
    record = {"file": rank_file(rank), "rank": rank, "tensors": records,
              **write_tensors(tmp / rank_file(rank), tensors)}
    if os.environ.get(PAUSE_ENV):
        time.sleep(float(os.environ[PAUSE_ENV]))
    gathered = [None] * groups.layout.world_size if rank == 0 else None
    dist.gather_object(record, gathered, dst=0)
    if rank == 0:
        head = {"step": step, "layout": layout_dict(groups.layout), "engine": engine.name,
                "data": data_state or {"step": step}, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _commit(tmp, root / name, merge_records(gathered, head), cfg)
    dist.barrier()
    log.info("checkpoint %s saved", root / name)
    return root / name


def _commit(tmp: Path, final: Path, manifest: dict, cfg: Config) -> None:
    write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    write_durable(tmp / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. after a resume)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    write_atomic(final.parent / LATEST, final.name.encode())
    prune(final.parent, cfg.train.keep_last)


def _remove_stale(root: Path) -> None:
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


# ---------------------------------------------------------------- resume
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


def resolve_resume(resume: str, run_dir: str) -> Path | None:
    """train.resume: "" (fresh start), "auto" (latest in run_dir, if any) or a path."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(Path(run_dir) / CKPT_DIR)
    path = Path(resume)
    if (path / MANIFEST).is_file():
        return path
    for root in (path, path / CKPT_DIR):
        if root.is_dir() and (found := latest_checkpoint(root)):
            return found
    raise CheckpointError(f"train.resume ({resume}): no checkpoint (no {MANIFEST}) there")


def maybe_resume(cfg: Config, engine, groups) -> int:
    """Load train.resume if set; returns the step to continue after (0: fresh start)."""
    path = resolve_resume(cfg.train.resume, cfg.train.run_dir)
    if path is None:
        if cfg.train.resume:
            log.info("train.resume=auto: no checkpoint in %s yet, starting fresh", cfg.train.run_dir)
        return 0
    return load_checkpoint(engine, groups, path)["step"]


# ---------------------------------------------------------------- load
def _verify_together(reader: CheckpointReader, groups) -> None:
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
def load_checkpoint(engine, groups, path: Path, optimizer: bool = True) -> dict:
    """Collective (one broadcast). Fills the model, AdamW state and RNG; returns the manifest.

    Works across engines (a DeepSpeed save resumes under torch and back): both save whole
    fp32 tensors per slice; `engine.load_param_states` puts them where the engine keeps them."""
    reader = CheckpointReader(Path(path))
    _verify_together(reader, groups)
    specs = param_specs(engine.module, groups)
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
