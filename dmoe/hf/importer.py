"""`dmoe import`: a Hugging Face checkpoint becomes a dmoe run directory.

    import_hf("path/to/Qwen3-30B-A3B", "runs/qwen3", overrides=["--train.lr=1e-4"])

RUN_DIR afterwards (resume with `--config RUN_DIR/config.yaml --train.resume=RUN_DIR`):
    config.yaml                        the resolved config (architecture from config.json,
                                       training from --config FILE and overrides)
    checkpoints/latest, step_000000/   a dmoe checkpoint for a 1-rank layout, `param/<name>`
                                       tensors only (fp32 master weights): any layout loads
                                       it (resharding on load); AdamW starts fresh
    hf_files/                          the source's tokenizer and generation files (export
                                       and generate use them)

In order: read config.json and every shard header; map the config (dmoe.hf.families) and
the names (dmoe.hf.weights); check every HF tensor's presence and shape and that none is
left over, before writing anything; then stream: one HF tensor group in, one dmoe tensor
out (dmoe.hf.safetensors_stream), so no more than one parameter is ever held twice. It
all happens in a sibling temp dir renamed to RUN_DIR at the end: a failure leaves nothing.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from dmoe.checkpoint.commit import CKPT_DIR, commit, step_name, temp_dir_for
from dmoe.checkpoint.format import merge_records, rank_file
from dmoe.checkpoint.save import layout_dict
from dmoe.checkpoint.slices import global_plan
from dmoe.config import Config, load_config
from dmoe.parallel.layout import ParallelLayout

from .errors import HFError
from .families import dmoe_values
from .hf_checkpoint import CONFIG, HFCheckpoint, read_config
from .safetensors_stream import StreamWriter
from .tokenizer import carry_in
from .weights import Link, hf_shapes, links_for, to_dmoe

log = logging.getLogger(__name__)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older checkpoints saved


def _merge(base: dict, values: dict) -> dict:
    out = dict(base)
    for key, value in values.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def resolve_config(values: dict, run_dir: Path, base_config: str | None,
                   overrides: list[str]) -> Config:
    """base --config FILE < the HF-derived architecture < dotted overrides."""
    tree = {}
    if base_config:
        try:
            tree = yaml.safe_load(Path(base_config).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise HFError(f"{base_config}: unreadable config ({err})".splitlines()[0]) from None
    tree = _merge(tree, {**values, "train": {"run_dir": str(run_dir)}})
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(tree, f, sort_keys=False)
        f.flush()
        return load_config(f.name, overrides)


def check_tensors(ckpt: HFCheckpoint, links: list[Link], plan: dict, tied: bool) -> None:
    """Every HF tensor the mapping needs is there with the implied shape; none is left."""
    missing = set(plan) - {link.dmoe for link in links}
    if missing:
        raise HFError(f"the dmoe model has parameters no HF tensor maps to: {sorted(missing)[:3]} "
                      "(an architecture override?)")
    for link in links:
        for name, want in zip(link.hf, hf_shapes(link, plan[link.dmoe][0])):
            if name not in ckpt.where:
                raise HFError(f"{ckpt.dir}: missing tensor {name} (needed by "
                              f"{ckpt.config.get('model_type')} for {link.dmoe})")
            got = ckpt.shape(name)
            if got != want:
                raise HFError(f"{ckpt.dir / ckpt.where[name]}: {name} has shape {got}, "
                              f"{CONFIG} implies {want}")
    used = {name for link in links for name in link.hf}
    extra = sorted(n for n in ckpt.names() - used
                   if not n.endswith(IGNORED_SUFFIXES) and not (tied and n == "lm_head.weight"))
    if extra:
        raise HFError(f"{ckpt.dir / ckpt.where[extra[0]]}: unexpected tensor {extra[0]} "
                      f"({len(extra)} in all) for model_type {ckpt.config.get('model_type')}")


def _write_checkpoint(ckpt: HFCheckpoint, links: list[Link], plan: dict, final: Path,
                      config_yaml: str) -> None:
    tmp = temp_dir_for(final)
    tmp.mkdir(parents=True)
    specs = [(f"param/{link.dmoe}", plan[link.dmoe][0], torch.float32) for link in links]
    writer = StreamWriter(tmp / rank_file(0), specs)
    try:
        for link in links:
            full = to_dmoe(link, [ckpt.get(name) for name in link.hf])
            writer.write(f"param/{link.dmoe}", full.to(torch.float32))
        info = writer.close()
    except BaseException:
        writer.abort()
        raise
    tensors = [{"name": link.dmoe, "shape": plan[link.dmoe][0], "dtype": "float32",
                "states": ["param"], "rule": None, "runs": None} for link in links]
    source_dtype = str(ckpt.dtype(links[0].hf[0])).removeprefix("torch.")
    head = {"step": 0, "layout": layout_dict(ParallelLayout(1)), "engine": "hf-import",
            "data": {"step": 0}, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "imported_from": {"dir": str(ckpt.dir), "model_type": ckpt.config.get("model_type"),
                              "dtype": source_dtype}}
    record = {"file": rank_file(0), "rank": 0, "tensors": tensors, **info}
    commit(tmp, final, merge_records([record], head), config_yaml)


def import_hf(hf_dir: str, run_dir: str, overrides: list[str] = (),
              base_config: str | None = None) -> Path:
    """Convert HF_DIR into the dmoe run directory RUN_DIR (see the module doc)."""
    run = Path(run_dir)
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise HFError(f"{run}: already exists and is not empty; choose a new run directory")
    values = dmoe_values(read_config(hf_dir), str(Path(hf_dir) / CONFIG))
    ckpt = HFCheckpoint(hf_dir)
    cfg = resolve_config(values, run, base_config, list(overrides))
    family = ckpt.config["model_type"]
    fused = any(name.endswith("experts.gate_up_proj") for name in ckpt.names())
    links, plan = links_for(cfg, family, fused), global_plan(cfg)
    check_tensors(ckpt, links, plan, cfg.model.tie_embeddings)
    tmp_run = run.with_name(f".tmp-{run.name}")
    shutil.rmtree(tmp_run, ignore_errors=True)
    tmp_run.mkdir(parents=True)
    try:
        config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        _write_checkpoint(ckpt, links, plan, tmp_run / CKPT_DIR / step_name(0), config_yaml)
        (tmp_run / "config.yaml").write_text(config_yaml)
        carry_in(ckpt.dir, tmp_run)
        os.replace(tmp_run, run)
    except BaseException:
        shutil.rmtree(tmp_run, ignore_errors=True)
        raise
    log.info("imported %s (%s, %d tensors -> %d dmoe parameters) into %s", ckpt.dir, family,
             len(ckpt.names()), len(links), run)
    return run
