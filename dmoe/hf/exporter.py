"""`dmoe export --format hf`: a dmoe checkpoint becomes a Hugging Face model directory.

    export_hf("runs/mixtral-tiny", "out/mixtral-tiny", dtype="bfloat16")

OUT_DIR afterwards (transformers.AutoModelForCausalLM / AutoTokenizer .from_pretrained):
    config.json                 the family dmoe.hf.families picks (or a one-line refusal)
    model.safetensors           per-expert names, as save_pretrained writes them; above
      or model-0000i-of-0000n.safetensors + model.safetensors.index.json   max_shard_size
    generation_config.json      eos = dmoe's end-of-text id 0 (an imported model: its own)
    tokenizer.json, tokenizer_config.json    dmoe.hf.tokenizer

Tensors stream: one dmoe parameter is assembled from its checkpoint pieces, cut into its
HF tensors and written (dmoe.hf.safetensors_stream), then dropped. Written into a
sibling temp dir renamed to OUT_DIR at the end: a failure leaves nothing.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from dmoe.checkpoint.format import MANIFEST
from dmoe.checkpoint.offline import open_checkpoint
from dmoe.config import load_config

from .errors import HFError
from .families import EOT_ID, family_for, hf_config
from .hf_checkpoint import INDEX, SINGLE
from .safetensors_stream import StreamWriter, nbytes
from .tokenizer import hf_files_of, source_token_ids, write_hf_tokenizer
from .weights import hf_shapes, links_for, to_hf

log = logging.getLogger(__name__)
DTYPES = ("float32", "bfloat16", "float16", "float64")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
         "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 (transformers' units; KiB/MiB/GiB binary), '1000' -> 1000 bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in UNITS:
        raise HFError(f"--max-shard-size ({text!r}) must look like 5GB, 500MB or a byte count")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def plan_shards(entries: list[tuple[str, list[int]]], dtype: torch.dtype, limit: int
                ) -> list[list[tuple[str, list[int]]]]:
    """Consecutive tensors into shards of at most `limit` bytes (a bigger tensor: alone)."""
    shards, size = [[]], 0
    for name, shape in entries:
        n = nbytes(shape, dtype)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def _shard_name(i: int, n: int) -> str:
    return SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_weights(reader, links, shards, dtype: torch.dtype, out: Path) -> dict[str, str]:
    def produced():
        for link in links:
            full = reader.global_tensor(link.dmoe, "param")
            for name, part in zip(link.hf, to_hf(link, full)):
                yield name, part.to(dtype)

    stream, weight_map = produced(), {}
    for i, shard in enumerate(shards):
        file = _shard_name(i, len(shards))
        writer = StreamWriter(out / file, [(n, s, dtype) for n, s in shard], {"format": "pt"})
        try:
            for _ in shard:
                name, tensor = next(stream)
                writer.write(name, tensor)
                weight_map[name] = file
            writer.close()
        except BaseException:
            writer.abort()
            raise
    return weight_map


def _write_generation_config(checkpoint: Path, out: Path) -> None:
    """An imported model's own, as it came; else: stop at dmoe's end-of-text id."""
    files = hf_files_of(checkpoint)
    if files is not None and (files / "generation_config.json").is_file():
        shutil.copy2(files / "generation_config.json", out / "generation_config.json")
        return
    ours = {"eos_token_id": EOT_ID, "pad_token_id": EOT_ID}
    (out / "generation_config.json").write_text(json.dumps(ours, indent=2))


def export_hf(src: str, out: str, dtype: str = "float32", max_shard_size: str = "5GB",
              tokenizer_json: str | None = None) -> Path:
    """Write SRC (a checkpoint, checkpoints/ dir or run dir) as an HF model into OUT."""
    if dtype not in DTYPES:
        raise HFError(f"--dtype ({dtype!r}) must be one of {list(DTYPES)}")
    limit, target = parse_size(max_shard_size), getattr(torch, dtype)
    reader, out_dir = open_checkpoint(src), Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise HFError(f"{out_dir}: already exists and is not empty; choose a new output directory")
    cfg = load_config(reader.dir / "config.yaml", ["--parallel.tp=1", "--parallel.ep=1"])
    family = family_for(cfg)
    e = cfg.moe
    if e.capacity_factor or e.eval_capacity_factor:
        log.warning("moe.capacity_factor (%s) / eval_capacity_factor (%s): transformers runs "
                    "dropless, so its outputs differ wherever dmoe drops tokens",
                    e.capacity_factor, e.eval_capacity_factor)
    links = links_for(cfg, family)
    unmapped = sorted(set(reader.tensors) - {link.dmoe for link in links})
    if unmapped:
        raise HFError(f"{reader.dir / MANIFEST}: {unmapped[0]} has no {family} tensor")
    entries = [(name, shape) for link in links
               for name, shape in zip(link.hf, hf_shapes(link, reader.entry(link.dmoe)["shape"]))]
    shards = plan_shards(entries, target, limit)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weight_map = _write_weights(reader, links, shards, target, tmp)
        if len(shards) > 1:
            total = sum(nbytes(shape, target) for _, shape in entries)
            (tmp / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config = hf_config(cfg, family, dtype, source_token_ids(reader.dir))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _write_generation_config(reader.dir, tmp)
        write_hf_tokenizer(tmp, cfg, reader.dir, tokenizer_json)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (step %s) as %s (%s, %d tensors in %d file%s) to %s", reader.dir,
             reader.manifest["step"], family, dtype, len(entries), len(shards),
             "s" if len(shards) > 1 else "", out_dir)
    return out_dir
