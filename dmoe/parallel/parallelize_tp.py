"""Apply tensor parallelism to a built MoETransformer, in place.

    apply_tensor_parallel(model, tp_group)

Plan (Megatron's layout; one all-reduce per sub-layer forward, one per backward):
    tok_emb              VocabParallelEmbedding    (rows split by vocab)
    blocks[i].attn.qkv   ColumnParallelLinear      (whole heads; q, k, v of a head together)
    blocks[i].attn.proj  RowParallelLinear         (the same heads' input columns)
    blocks[i].ffn (MLP)  fc1 column, fc2 row
    blocks[i].ffn (MoE)  token-sliced: every TP rank holds the same tokens; it routes only
                         its 1/tp slice, and the outputs are all-gathered (experts are not
                         TP-sharded, so under EP each TP rank sends 1/tp of the tokens)
    lm_head              ColumnParallelLinear (vocab-sharded logits; tied to tok_emb if it was)
    model.loss_fn        vocab_parallel_cross_entropy (the logits are never gathered)
LayerNorms, learned positions and the MoE router stay replicated.

Gradient bookkeeping, read by dmoe.parallel.grads:
    param.dmoe_tp_sharded = True   a TP shard: its squared norm is summed over TP
    param.dmoe_tp_partial = True   MoE router (and, without EP, expert) params: each TP
                                   rank saw only its token slice, so the grads must be
                                   summed over TP before the DP reduction. Expert params
                                   tagged `dmoe_expert` (by EP) are left False: their edp
                                   group already spans the TP ranks (dmoe.parallel.layout).
                                   Re-evaluated on every forward, so it holds whichever
                                   order TP and EP were applied in.

MoE semantics under token slicing (as with any split of the batch): capacity is computed
per slice; the reported routed/kept counts are summed over TP; the z-loss equals the
full-batch one; the load-balance loss is the mean of the slices' losses.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.distributed as dist
from torch import nn

from dmoe.moe.layer import MoELayer, MoEStats

from .tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    _Sharded,
    shard_range,
    vocab_parallel_cross_entropy,
)
from .tp_collectives import (
    gather_first_dim,
    group_rank,
    group_size,
    reduce_from_region,
    split_first_dim,
)

log = logging.getLogger(__name__)


def apply_tensor_parallel(model: nn.Module, tp_group) -> nn.Module:
    """Swap the model's linears, embedding, head and loss for TP versions. No communication."""
    tp, rank = group_size(tp_group), group_rank(tp_group)
    tied = model.lm_head.weight is model.tok_emb.weight
    model.tok_emb = VocabParallelEmbedding(model.tok_emb, tp_group)
    for i, block in enumerate(model.blocks):
        _parallelize_attention(block.attn, tp_group, f"blocks.{i}.attn")
        if isinstance(block.ffn, MoELayer):
            slice_moe_tokens(block.ffn, tp_group)
        else:
            block.ffn.fc1 = ColumnParallelLinear(block.ffn.fc1, tp_group)
            block.ffn.fc2 = RowParallelLinear(block.ffn.fc2, tp_group)
    model.lm_head = ColumnParallelLinear(model.lm_head, tp_group)
    if tied:
        model.lm_head.weight = model.tok_emb.weight  # same vocab rows on this rank
    vocab_start, _ = shard_range(model.lm_head.out_features, rank, tp)
    model.loss_fn = functools.partial(
        vocab_parallel_cross_entropy, group=tp_group, vocab_start=vocab_start
    )
    _tag_sharded(model)
    log.info("tensor parallel: tp=%d, rank %d holds vocab [%d, %d)%s", tp, rank,
             model.tok_emb.vocab_start, model.tok_emb.vocab_end, " (tied head)" if tied else "")
    return model


def _parallelize_attention(attn: nn.Module, group, where: str) -> None:
    n_heads = attn.qkv.out_features // (3 * attn.head_dim)
    if n_heads < group_size(group):
        raise ValueError(
            f"{where}: model.n_heads ({n_heads}) must be at least parallel.tp ({group_size(group)})"
        )
    attn.qkv = ColumnParallelLinear(attn.qkv, group, chunks=3, unit=attn.head_dim)
    attn.proj = RowParallelLinear(attn.proj, group, unit=attn.head_dim)


def _tag_sharded(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, _Sharded):
            for name, param in module.named_parameters(recurse=False):
                if name in module.full_sizes:
                    param.dmoe_tp_sharded = True


# ---------------------------------------------------------------- MoE token slicing
def slice_moe_tokens(moe: MoELayer, tp_group) -> MoELayer:
    """In place: route only this TP rank's slice of the tokens through `moe`.

    Hooks, so parameter names (and checkpoints) stay those of the plain model.
    Communication: forward one all-gather of the outputs, one all-reduce of the routing
    counts and one of the two router losses; backward one all-gather of the input grad.
    """
    moe.register_forward_pre_hook(functools.partial(_slice_tokens, group=tp_group))
    moe.register_forward_hook(functools.partial(_gather_tokens, group=tp_group))
    _tag_partial(moe)
    return moe


def _tag_partial(moe: nn.Module) -> None:
    for param in moe.parameters():
        param.dmoe_tp_partial = not getattr(param, "dmoe_expert", False)


def _slice_tokens(moe: MoELayer, args: tuple, group):
    (x_BSD,) = args
    tokens, tp = x_BSD.numel() // x_BSD.shape[-1], group_size(group)
    if tokens % tp:
        raise ValueError(
            f"tokens per rank (micro_batch_size * seq_len = {tokens}) must be divisible by "
            f"parallel.tp ({tp}) for a token-sliced MoE layer"
        )
    moe._tp_input_shape = x_BSD.shape
    _tag_partial(moe)  # cheap, and covers expert shards swapped in after TP was applied
    return (split_first_dim(x_BSD.reshape(tokens, x_BSD.shape[-1]), group),)


def _gather_tokens(moe: MoELayer, args: tuple, output: tuple, group):
    y_TlD, stats = output
    y_BSD = gather_first_dim(y_TlD, group).view(moe._tp_input_shape)
    return y_BSD, combine_stats(stats, group)


def combine_stats(stats: MoEStats, group) -> MoEStats:
    """Whole-batch stats from per-slice ones. Communication: two all-reduces."""
    tp = group_size(group)
    counts_2E = torch.stack([stats.routed_E, stats.kept_E])
    if tp > 1:
        counts_2E = counts_2E.clone()
        dist.all_reduce(counts_2E, group=group)
    losses = reduce_from_region(torch.stack([stats.aux_loss, stats.z_loss]) / tp, group)
    return MoEStats(counts_2E[0], counts_2E[1], losses[0], losses[1], stats.capacity)


# ---------------------------------------------------------------- reassembly
@torch.no_grad()
def gather_full_tensors(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """name -> full (unsharded over TP) parameter, or its grad; names as named_parameters().

    Communication: one all-gather per TP-sharded parameter, so every TP rank must call it.
    Replicated parameters are returned as they are (cloned); missing grads as None.
    """
    out, seen = {}, set()
    for mname, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            local = param.grad if grads else param
            name = f"{mname}.{pname}" if mname else pname
            if local is None:
                out[name] = None
            elif isinstance(module, _Sharded) and pname in module.full_sizes:
                out[name] = module.unshard(pname, local)
            else:
                out[name] = local.detach().clone()
    return out
