"""Resume a run from a checkpoint, in this layout or another (resharding on load).

Loading reads each parameter's slice for this rank's layout: the matching piece when the
layout is the saving one, else the global tensor assembled from the manifest's pieces and
cut again (TP, EP and DP degrees may all change). Communication: one broadcast (rank 0's
verdict on every file's checksum) so that all ranks fail together.
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
from dmoe.parallel.layout import ProcessGroups

from .commit import CKPT_DIR, STEP_DIR, complete_checkpoints, resolve_checkpoint
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
    check_architecture(reader.dir / "config.yaml", engine.module.cfg)
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


# What the saved weights mean: a resume that changes one of these with the same tensor
# shapes (4 heads vs 8 of the same width) would silently train a different model. Capacity,
# loss coefficients, top_k, jitter and everything outside model/moe may change on resume.
ARCHITECTURE_KEYS = {
    "model": ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
              "positions", "norm", "bias", "qkv_bias", "qk_norm", "rope_theta", "mlp_activation",
              "tie_embeddings"),
    "moe": ("num_experts", "every", "first_dense_layers", "expert_ffn_dim", "activation",
            "score_func", "num_shared_experts", "shared_expert_ffn_dim", "shared_expert_gate"),
}


def check_architecture(saved_config: Path, cfg: Config) -> None:
    """Refuse (one line naming the first differing key) to load weights saved by a model of
    another architecture, unless train.allow_arch_change. No saved config: nothing to check."""
    if cfg.train.allow_arch_change or not saved_config.is_file():
        return
    try:
        saved = yaml.safe_load(saved_config.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise CheckpointError(f"{saved_config}: unreadable ({err})".splitlines()[0]) from None
    for section, keys in ARCHITECTURE_KEYS.items():
        ours = getattr(cfg, section)
        for key in keys:
            theirs = saved.get(section, {}).get(key, getattr(ours, key)) if isinstance(saved, dict) else None
            if theirs != getattr(ours, key):
                raise CheckpointError(
                    f"{saved_config}: saved with {section}.{key}={theirs!r}, this run has "
                    f"{getattr(ours, key)!r}; the weights mean another model (set "
                    "--train.allow_arch_change=true to load them anyway)")


def _restore_rng(reader: CheckpointReader, rank: int) -> None:
    """This rank's RNG states, where the checkpoint has them (offline reshards do not)."""
    keys = set(reader.keys(rank_file(rank)))
    if "rng/torch" in keys:
        torch.set_rng_state(reader.get(rank_file(rank), "rng/torch"))
    if torch.cuda.is_available() and "rng/cuda" in keys:
        torch.cuda.set_rng_state(reader.get(rank_file(rank), "rng/cuda"))


def check_fresh_start(cfg: Config, rank: int) -> None:
    """A fresh start (train.resume "") in a run_dir that already holds checkpoints would mix
    two runs in one checkpoints/ (and prune one with the other): refuse, or with
    train.overwrite move the old checkpoints/ aside (rank 0; no communication)."""
    t = cfg.train
    root = Path(t.run_dir) / CKPT_DIR
    if t.resume or not root.is_dir():
        return
    done = complete_checkpoints(root)
    if not done:
        return
    if not t.overwrite:
        newest = max(int(STEP_DIR.match(p.name).group(1)) for p in done)
        raise CheckpointError(
            f"train.run_dir {t.run_dir} already holds checkpoints up to step {newest}: resume with "
            "--train.resume=auto, or choose another run dir / --train.overwrite=true")
    if rank == 0:
        aside = root.with_name(f"{CKPT_DIR}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        root.rename(aside)
        log.warning("train.overwrite: moved the old checkpoints of %s aside to %s", t.run_dir, aside)
