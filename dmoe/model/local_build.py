"""Build only this rank's shard of the model, bit for bit what a full build then sharding
gives, with peak host memory of one full parameter instead of the whole model per rank.

    model = build_local_model(cfg, groups)   # instead of: seed, MoETransformer(cfg), parallelize

How (no communication beyond parallelize's own):
    1. build the model on the meta device under InitRecorder: every initialiser (an
       in-place op such as normal_ / uniform_ / zero_, or a factory such as ones) that
       touches a parameter also runs on a CPU tensor of the parameter's full shape, dropped
       at once, so the RNG advances exactly as in a CPU build; each is recorded with the
       RNG state before it
    2. parallelize on meta (the TP/EP shard shapes)
    3. replace each local parameter by a CPU one filled from a replay of its recorded
       initialisers on one full-size CPU tensor, cut to this rank's slice by the sharding
       plan (dmoe.checkpoint.slices: the checkpoint's slices), keeping its parallel roles
       and ties; buffers (the rotary tables) are computed again
    4. leave the RNG where the full build left it (dropout, jitter and data draws after
       the build see the same stream)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dmoe.config import Config
from dmoe.parallel.layout import ProcessGroups
from dmoe.parallel.parallelize import parallelize

from .transformer import MoETransformer, rotary_tables


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # aliases (a Parameter of a tensor) share it


class InitRecorder(TorchDispatchMode):
    """Records, per meta storage, the ops that give it its values (see the module doc)."""

    def __init__(self):
        super().__init__()
        self.ops: dict[int, list[tuple]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        first = func._schema.arguments[0] if func._schema.arguments else None
        writes = first is not None and first.alias_info is not None and first.alias_info.is_write
        if writes and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            target = args[0]
            state = torch.get_rng_state()
            func(torch.empty(target.shape, dtype=target.dtype), *args[1:], **kwargs)  # RNG draws
            where = (tuple(target.shape), target.stride(), target.storage_offset())
            self.ops.setdefault(_key(target), []).append((state, func, args[1:], kwargs, where))
        elif (isinstance(out, torch.Tensor) and out.is_meta
              and not any(isinstance(a, torch.Tensor) for a in args)):
            self.ops.setdefault(_key(out), []).append((None, func, args, kwargs, None))
        return out


def replay(ops: list[tuple], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The full CPU tensor the recorded initialisers produce (the RNG is left as found)."""
    saved, full = torch.get_rng_state(), None
    try:
        for state, func, args, kwargs, where in ops:
            if where is None:  # a factory
                full = func(*args, **{**kwargs, "device": torch.device("cpu")})
                continue
            if full is None:
                full = torch.empty(shape, dtype=dtype)
            torch.set_rng_state(state)
            func(full.as_strided(*where), *args, **kwargs)
    finally:
        torch.set_rng_state(saved)
    if full is None:
        raise RuntimeError("no initialiser recorded")
    return full


def build_local_model(cfg: Config, groups: ProcessGroups, seed: int | None = None) -> MoETransformer:
    """Seeded with train.seed (or `seed`); this rank's shard of the model on the CPU."""
    from dmoe.checkpoint.slices import cut, param_slices

    torch.manual_seed(cfg.train.seed if seed is None else seed)
    recorder = InitRecorder()
    with torch.device("meta"), recorder:
        model = MoETransformer(cfg)
    after_build = torch.get_rng_state()
    sources = {name: (recorder.ops.get(_key(p)), p.shape, p.dtype)
               for name, p in model.named_parameters()}
    parallelize(model, groups)
    pieces = {id(piece.param): piece for piece in param_slices(model, groups.layout, groups.rank)}
    local: dict[int, nn.Parameter] = {}  # old meta param -> its CPU shard (tied weights once)
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in local:
                    piece = pieces[id(p)]
                    ops, shape, dtype = sources[piece.name]
                    if not ops:
                        raise RuntimeError(f"{piece.name}: no initialiser recorded in the meta build")
                    value = cut(replay(ops, shape, dtype), piece.rule, piece.runs)
                    new = nn.Parameter(value, requires_grad=p.requires_grad)
                    new.__dict__.update(p.__dict__)  # the parallel roles (dmoe.parallel.param_roles)
                    local[id(p)] = new
                module._parameters[name] = local[id(p)]
    if model.pos_emb is None:
        m = cfg.model
        cos, sin = rotary_tables(m.seq_len, m.head_dim or m.d_model // m.n_heads, m.rope_theta)
        model.rope_cos, model.rope_sin = cos, sin
    meta = [name for name, b in model.named_buffers() if b.is_meta]
    if meta:
        raise RuntimeError(f"buffers without values after the meta build: {meta}")
    torch.set_rng_state(after_build)
    return model
