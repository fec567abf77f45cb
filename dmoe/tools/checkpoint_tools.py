"""`dmoe checkpoint reshard|export`: offline, single process, no process groups.

    dmoe checkpoint reshard SRC OUT --world-size 8 --tp 2 --ep 4
        OUT becomes a checkpoint for that layout (resume with --train.resume=OUT)
    dmoe checkpoint export SRC model.safetensors
        one file: every parameter whole, named as the unsharded model's named_parameters()

SRC is a checkpoint directory (with manifest.json), a run's checkpoints/ directory or a
run directory (its latest). Resharding needs no tool (a run resumed under another layout
reshards on load); this one writes the target layout's files ahead of time. The target's
TP/EP cuts come from `plan_rules`, the model's sharding plan (it must agree with what
dmoe.parallel does to a live model; tests pin that). Holds the whole model in memory.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dmoe.config import load_config
from dmoe.model.transformer import MLP, Attention, MoETransformer
from dmoe.moe.experts import GroupedExperts
from dmoe.parallel.layout import ParallelLayout
from dmoe.train.checkpoint import layout_dict, resolve_resume
from dmoe.train.ckpt_io import (MANIFEST, CheckpointReader, fsync_dir, merge_records, rank_file,
                                write_durable, write_tensors)
from dmoe.train.shard_spec import CheckpointError, ShardRule, cut, is_writer, rule_runs

log = logging.getLogger(__name__)


def plan_rules(model: torch.nn.Module) -> dict[str, ShardRule]:
    """name -> how TP (dmoe.parallel.parallelize_tp) or EP would cut it; absent: replicated."""
    rules = {"tok_emb.weight": ShardRule("tp", 0)}
    for mname, module in model.named_modules():
        if isinstance(module, Attention):
            rules[f"{mname}.qkv.weight"] = ShardRule("tp", 0, 3, module.head_dim)
            rules[f"{mname}.proj.weight"] = ShardRule("tp", 1, 1, module.head_dim)
        elif isinstance(module, MLP):
            rules[f"{mname}.fc1.weight"] = ShardRule("tp", 0)
            rules[f"{mname}.fc2.weight"] = ShardRule("tp", 1)
        elif isinstance(module, GroupedExperts):
            rules[f"{mname}.w1"] = rules[f"{mname}.w2"] = ShardRule("ep", 0)
    if model.lm_head.weight is not model.tok_emb.weight:
        rules["lm_head.weight"] = ShardRule("tp", 0)
    return rules


def _open(src: str) -> CheckpointReader:
    path = resolve_resume(src, ".") if not (Path(src) / MANIFEST).is_file() else Path(src)
    reader = CheckpointReader(path)
    reader.verify_all()
    return reader


def _target_rule(rule: ShardRule | None, layout: ParallelLayout) -> ShardRule | None:
    if rule is None or (rule.kind == "tp" and layout.tp == 1) or (rule.kind == "ep" and layout.ep == 1):
        return None
    return rule


def reshard(src: str, out: str, world_size: int, tp: int = 1, ep: int = 1) -> Path:
    """Write SRC's model and AdamW state cut for layout (world_size, tp, ep) into OUT."""
    reader, out_dir = _open(src), Path(out)
    if out_dir.exists():
        raise CheckpointError(f"{out_dir}: already exists; choose a new output directory")
    cfg = load_config(reader.dir / "config.yaml", [f"--parallel.tp={tp}", f"--parallel.ep={ep}"])
    layout = ParallelLayout(world_size, tp=tp, ep=ep)
    layout.validate(cfg.moe.num_experts)
    with torch.device("meta"):
        rules = plan_rules(MoETransformer(cfg))
    shards = {r: ({}, []) for r in range(world_size)}
    for name, entry in reader.tensors.items():
        rule = _target_rule(rules.get(name), layout)
        writers = [r for r in range(world_size) if is_writer(rule, layout, r)]
        full = {s: reader.global_tensor(name, s) for s in entry["states"]}
        for r in writers:
            runs = rule_runs(rule, entry["shape"][rule.dim], layout, r) if rule else None
            for state, value in full.items():
                shards[r][0][f"{state}/{name}"] = value if state == "step" else cut(value, rule, runs)
            shards[r][1].append({**{k: entry[k] for k in ("shape", "dtype", "states")}, "name": name,
                                 "rule": rule.to_json() if rule else None, "runs": runs})
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    records = [{"file": rank_file(r), "rank": r, "tensors": recs,
                **write_tensors(tmp / rank_file(r), t)} for r, (t, recs) in shards.items()]
    head = {k: reader.manifest[k] for k in ("step", "engine", "data")}
    head.update(layout=layout_dict(layout), resharded_from=str(reader.dir))
    write_durable(tmp / MANIFEST, json.dumps(merge_records(records, head), indent=1).encode())
    cfg_text = (reader.dir / "config.yaml").read_text()
    write_durable(tmp / "config.yaml", cfg_text.encode())
    fsync_dir(tmp)
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    log.info("resharded %s (%s) -> %s (%s)", reader.dir, reader.manifest["layout"], out_dir,
             layout_dict(layout))
    return out_dir


def export(src: str, out: str, dtype: str | None = None) -> Path:
    """One safetensors file of whole parameters (no optimizer state, no pickle)."""
    reader = _open(src)
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


def load_exported(model: torch.nn.Module, path: str) -> None:
    """Fill an unsharded model from an export; tied weights (lm_head = tok_emb) follow."""
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    names = {n for n, _ in model.named_parameters()}
    really_missing = [k for k in missing if k in names]
    if really_missing or unexpected:
        raise CheckpointError(f"{path}: missing {really_missing[:4]}, unexpected {unexpected[:4]}")


def main(argv: list[str]) -> int:
    """`dmoe checkpoint {reshard,export} ...`; errors are one line on stderr, exit 2."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="dmoe checkpoint")
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reshard", help="write a checkpoint for another layout")
    r.add_argument("src")
    r.add_argument("out")
    r.add_argument("--world-size", type=int, required=True)
    r.add_argument("--tp", type=int, default=1)
    r.add_argument("--ep", type=int, default=1)
    e = sub.add_parser("export", help="one consolidated safetensors file of the model")
    e.add_argument("src")
    e.add_argument("out")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default=None)
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if a.cmd == "reshard":
            reshard(a.src, a.out, a.world_size, a.tp, a.ep)
        else:
            export(a.src, a.out, a.dtype)
    except (CheckpointError, ValueError) as err:
        sys.stderr.write(f"checkpoint error: {err}\n")
        return 2
    return 0
